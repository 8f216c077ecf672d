"""Reading corpora: document boundaries, compression, and every bad-input kind (small inputs)."""
import bz2
import gzip
import json
import lzma

import pytest
import zstandard

from data_prep import inputs
from data_prep.errors import DataPrepError, SkipCounter
from data_prep.inputs import ReadOptions, discover, iter_documents


def read_docs(paths, **kw):
    """Whole documents (pieces joined) and the skip counts."""
    skips = SkipCounter()
    docs, cur = [], []
    for _, _, piece, last in iter_documents(discover([str(p) for p in paths]),
                                            ReadOptions(**kw), skips):
        cur.append(piece)
        if last:
            docs.append("".join(cur))
            cur = []
    assert cur == [], "a document was left open"
    return docs, skips.as_dict()


def test_blank_line_documents(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n \nTitle 1\n\n  1 verse one\n  2 verse\ttwo  \n \t \n\n"
                 "Title 2\r\n\r\nlast line", encoding="utf-8")
    docs, skips = read_docs([f], doc_sep="blank-line")
    assert docs == ["Title 1", "  1 verse one\n  2 verse\ttwo  ", "Title 2", "last line"]
    assert skips["empty_documents"] == 0


def test_one_document_per_file_is_exact_and_sorted(tmp_path):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / "b" / "z.txt").write_text("zeta\n\n\nend\n", encoding="utf-8")
    (d / "a.txt").write_text("  alpha \t\n", encoding="utf-8")
    (d / ".hidden.txt").write_text("never read", encoding="utf-8")
    srcs = discover([str(d)])
    assert [s.identity for s in srcs] == ["a.txt", "b/z.txt"]
    docs, _ = read_docs([d])
    assert docs == ["  alpha \t\n", "zeta\n\n\nend\n"]


def test_empty_and_whitespace_documents_are_counted_not_yielded(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i, text in enumerate(["", " ", "\n", "a"]):
        (d / f"{i}.txt").write_text(text, encoding="utf-8")
    docs, skips = read_docs([d])
    assert docs == ["a"]
    assert skips["empty_documents"] == 3
    j = tmp_path / "docs.jsonl"
    j.write_text("\n".join(json.dumps({"text": t}) for t in ["", " ", "\n", "a"]) + "\n",
                 encoding="utf-8")
    docs, skips = read_docs([j])
    assert docs == ["a"]
    assert skips["empty_documents"] == 3


@pytest.mark.parametrize("compress,suffix", [
    (gzip.compress, ".gz"), (lzma.compress, ".xz"), (bz2.compress, ".bz2"),
    (lambda b: zstandard.ZstdCompressor().compress(b), ".zst")])
def test_compressed_inputs_match_plain(tmp_path, compress, suffix):
    text = "".join(f"Paragraph {i}\nline é 中 😀\n\n" for i in range(300))
    plain = tmp_path / "p.txt"
    plain.write_text(text, encoding="utf-8")
    comp = tmp_path / ("c.txt" + suffix)
    comp.write_bytes(compress(text.encode("utf-8")))
    assert read_docs([comp], doc_sep="blank-line") == read_docs([plain], doc_sep="blank-line")
    assert len(read_docs([comp], doc_sep="blank-line")[0]) == 300


@pytest.mark.parametrize("compress,suffix,kind", [
    (gzip.compress, ".gz", "gzip"), (lzma.compress, ".xz", "xz"),
    (lambda b: zstandard.ZstdCompressor().compress(b), ".zst", "zstd")])
def test_truncated_compressed_file_names_the_file(tmp_path, compress, suffix, kind):
    data = compress(("some text that compresses " * 5000).encode())
    f = tmp_path / ("cut.txt" + suffix)
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataPrepError) as e:
        read_docs([f])
    assert "cut.txt" + suffix in str(e.value) and kind in str(e.value)
    assert "truncated" in str(e.value)


def test_invalid_utf8_replace_skip_fail(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"caf\xc3\xa9 ok\n\nbad \xff\xfe here\n\nfine\n")
    docs, skips = read_docs([f], doc_sep="blank-line")
    assert docs == ["café ok", "bad \ufffd\ufffd here", "fine"]
    assert skips["invalid_utf8_sequences"] == 2 and skips["files_with_invalid_utf8"] == 1
    docs, skips = read_docs([f], doc_sep="blank-line", errors="skip")
    assert docs == ["café ok", "bad  here", "fine"]
    assert skips["invalid_utf8_sequences"] == 2
    with pytest.raises(DataPrepError) as e:
        read_docs([f], doc_sep="blank-line", errors="fail")
    assert "bad.txt: line 3" in str(e.value) and "invalid UTF-8" in str(e.value)


def test_binary_file_is_skipped_with_warning(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("real text", encoding="utf-8")
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 10)
    docs, skips = read_docs([tmp_path])
    assert docs == ["real text"]
    assert skips["binary_files"] == 1
    assert "b.bin" in capsys.readouterr().err


def test_jsonl_bad_lines_counted_or_strict(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "one"}\n'
                 'not json\n'
                 '{"body": "no key"}\n'
                 '{"text": 5}\n'
                 '\n'
                 '{"text": "two"}\n', encoding="utf-8")
    docs, skips = read_docs([f])
    assert docs == ["one", "two"]
    assert (skips["json_errors"], skips["json_missing_key"], skips["json_non_string"]) == (1, 1, 1)
    with pytest.raises(DataPrepError) as e:
        read_docs([f], strict=True)
    assert "d.jsonl:2" in str(e.value) and "not valid JSON" in str(e.value)
    docs, _ = read_docs([f], text_key="body")
    assert docs == ["no key"]


def test_jsonl_line_longer_than_limit(tmp_path):
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"text": "x" * 5000}) + "\n" + json.dumps({"text": "short"}) + "\n"
                 + json.dumps({"text": "y" * 3000}), encoding="utf-8")
    docs, skips = read_docs([f], max_line_bytes=1000)
    assert docs == ["short"]
    assert skips["lines_too_long"] == 2
    with pytest.raises(DataPrepError, match=r"long.jsonl:1"):
        read_docs([f], max_line_bytes=1000, strict=True)


def test_lines_far_longer_than_the_buffers_stream_in_pieces(tmp_path, monkeypatch):
    # shrink the piece and block sizes so "far longer than any buffer" stays a small test
    monkeypatch.setattr(inputs, "PIECE_CHARS", 64)
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 100)
    line = "".join(chr(0x4E00 + i % 500) if i % 7 else "word " for i in range(3000))
    f = tmp_path / "one_line.txt"
    f.write_text(f"{line}\n\nshort\n\n{line}", encoding="utf-8")
    skips = SkipCounter()
    pieces = list(iter_documents(discover([str(f)]), ReadOptions(doc_sep="blank-line"), skips))
    assert max(len(p) for _, _, p, _ in pieces) <= 128
    docs, cur = [], ""
    for _, _, p, last in pieces:
        cur += p
        if last:
            docs.append(cur)
            cur = ""
    assert docs == [line, "short", line]
    # the same cut points whatever the block size: pieces depend on the text only
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 37)
    again = list(iter_documents(discover([str(f)]), ReadOptions(doc_sep="blank-line"),
                                SkipCounter()))
    assert again == pieces


def test_missing_input_and_bad_option(tmp_path):
    with pytest.raises(DataPrepError, match="does not exist"):
        discover([str(tmp_path / "nope.txt")])
    with pytest.raises(DataPrepError, match="--doc-sep"):
        ReadOptions(doc_sep="paragraph").validate()


def test_merge_short_joins_titles_to_their_chapters(tmp_path):
    f = tmp_path / "bible.txt"
    f.write_text("\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n"
                 "  1 Thus the heavens.\n\n\nA\n\nB\n\nlong enough paragraph\n\nEnd", encoding="utf-8")
    docs, _ = read_docs([f], doc_sep="blank-line", merge_short=12)
    assert docs == ["Genesis 1\n\n  1 In the beginning.\n  2 And the earth.",
                    "Genesis 2\n\n  1 Thus the heavens.",
                    "A\n\nB\n\nlong enough paragraph", "End"]
    with pytest.raises(DataPrepError, match="--merge-short"):
        ReadOptions(merge_short=5).validate()
