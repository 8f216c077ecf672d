"""SentencePiece tokenizer training: fixed ids, lossless settings, chunking, vocab limits."""
import gzip
import hashlib
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from data_prep import BUNDLED_CORPUS, DataPrepError, ReadOptions, train_tokenizer
from data_prep.cli import main as cli_main
from data_prep.tokenizer import split_for_training

SHARED_KJV = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpora" / "kjv.txt.gz"
TRICKY = ("Tabs\tand  double  spaces,   triple.\n\nNewlines\n\n\nCafé naïve Ångström résumé\n"
          "Emoji 😀🚀👍🏽 CJK 中文字符 日本語のテキスト 한국어\r\n\ttrailing \n")


def kjv_slice(path: Path, n_chars: int = 150_000) -> Path:
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        path.write_text(f.read(n_chars), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = kjv_slice(d / "kjv_slice.txt")
    info = train_tokenizer([str(corpus)], d / "out", vocab_size=1000,
                           read_options=ReadOptions(doc_sep="blank-line"))
    return d / "out", info


def test_fixed_ids_and_tokenizer_json(small_tok):
    out, info = small_tok
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    on_disk = json.loads((out / "tokenizer.json").read_text())
    assert on_disk["piece_count"] == sp.get_piece_size() == 1000
    assert on_disk["sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert on_disk["settings"]["byte_fallback"] is True
    assert on_disk["settings"]["normalization_rule_name"] == "identity"
    assert (out / "tokenizer.vocab").read_text().startswith("<pad>\t0\n<unk>\t0\n<s>\t0\n</s>\t0\n")
    assert not list(out.glob(".tokenizer-tmp-*")), "temporary training files left behind"


def test_lossless_round_trip_no_unk(small_tok):
    out, _ = small_tok
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in [TRICKY, "   leading spaces", "\n\nleading newlines", "x" * 3 + "\t\t\t" + "\n"]:
        ids = sp.encode(text)
        assert 1 not in ids, f"unk id in {text!r}"
        assert sp.decode(ids) == text
    # newline is learned as a piece (training chunks keep their newlines), not only byte fallback
    assert "\n" in [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def test_training_chunks_keep_every_character():
    text = "short line\n" + "é" * 3000 + "\n" + "tail"
    chunks = list(split_for_training(text, 1000))
    assert "".join(chunks) == text
    assert all(len(c.encode("utf-8")) <= 1000 for c in chunks)


def test_long_one_line_documents_are_chunked_not_dropped(tmp_path):
    # three documents of 5,000 characters on one line each (over SentencePiece's 4192-byte limit)
    d = tmp_path / "docs"
    d.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(3):
        line = " ".join(words[(i + j) % len(words)] + str(j % 10) for j in range(900))[:5000]
        assert len(line) == 5000 and "\n" not in line
        (d / f"{i}.txt").write_text(line, encoding="utf-8")
    info = train_tokenizer([str(d)], tmp_path / "tok", vocab_size=300)
    assert info["sampling"]["documents"] == 3
    assert info["sampling"]["sentences_used"] >= 6   # each 5,000-byte line cut into >= 2 chunks
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    # trained on the text: merges exist, so a document takes fewer tokens than its bytes
    text = (d / "0.txt").read_text()
    assert len(sp.encode(text)) < len(text) * 0.8


def test_vocab_too_large_fails_early_with_advice(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("".join(f"line number {i}\n" for i in range(20)), encoding="utf-8")
    with pytest.raises(DataPrepError) as e:
        train_tokenizer([str(f)], tmp_path / "tok", vocab_size=5000)
    msg = str(e.value)
    assert "--vocab-size 5000" in msg and "--soft-vocab-limit" in msg
    assert not (tmp_path / "tok" / "tokenizer.model").exists()
    info = train_tokenizer([str(f)], tmp_path / "tok", vocab_size=5000, soft_vocab_limit=True)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    assert info["piece_count"] == sp.get_piece_size() < 5000
    assert info["requested_vocab_size"] == 5000


def test_vocab_below_byte_pieces_is_refused(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(DataPrepError, match="too small"):
        train_tokenizer([str(f)], tmp_path / "tok", vocab_size=100)


def test_no_text_is_a_clear_error(tmp_path):
    (tmp_path / "e.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(DataPrepError, match="no text to train on"):
        train_tokenizer([str(tmp_path / "e.txt")], tmp_path / "tok", vocab_size=300)


@pytest.mark.timeout(120)
def test_real_kjv_corpus_cli(tmp_path, capsys):
    corpus = SHARED_KJV if SHARED_KJV.is_file() else BUNDLED_CORPUS
    assert BUNDLED_CORPUS.read_bytes() == corpus.read_bytes()
    rc = cli_main(["tokenizer", "--input", str(corpus), "--doc-sep", "blank-line",
                   "--vocab-size", "4000", "--max-sentences", "1500", "--out",
                   str(tmp_path / "tok"), "--quiet"])
    assert rc == 0
    info = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert info["piece_count"] == 4000
    assert info["sampling"]["sentences_used"] == 1500 < info["sampling"]["sentences_seen"]
    assert info["sampling"]["documents"] == 2378   # 1,189 chapter titles + 1,189 chapters
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        text = f.read()
    sample = text[1_000_000:1_020_000]
    ids = sp.encode(sample)
    assert sp.decode(ids) == sample and 1 not in ids
    assert len(sample.encode()) / len(ids) > 3.0   # a real vocabulary, not byte fallback
    assert "4000 pieces" in capsys.readouterr().out
