"""Input formats and foreign tokenizers (issue 14 section 1): Parquet read in record batches with
the JSONL bad-input rules, compressed JSON Lines streamed with the same rules, SentencePiece
models whose special ids are not ours, and the tokenizer's recorded path / sha256 / copy."""
import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import webdataset as wds
import zstandard

from data_prep import DataPrepError, ReadOptions, build_shards, train_tokenizer, verify_dataset
from data_prep.errors import SkipCounter
from data_prep.inputs import discover, iter_documents
from data_prep.tokenizer import file_sha256

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls hoot quietly".split()


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + f" é {i}."
            for i in range(n)]


def read_docs(paths, **kw):
    skips = SkipCounter()
    docs, cur = [], []
    opts = ReadOptions(**kw)
    for _, ordinal, piece, last in iter_documents(discover([str(p) for p in paths],
                                                           opts.input_format), opts, skips):
        cur.append(piece)
        if last:
            docs.append((ordinal, "".join(cur)))
            cur = []
    return docs, skips


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text("\n\n".join(texts(400)), encoding="utf-8")
    train_tokenizer([str(root / "c.txt")], root / "tok", vocab_size=400, soft_vocab_limit=True,
                    read_options=ReadOptions(doc_sep="blank-line"))
    return root / "tok" / "tokenizer.model"


# ----------------------------------------------------------------------------- Parquet
def write_parquet(path, columns, row_group_size=64):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_parquet_reads_the_same_documents_as_jsonl(tmp_path):
    t = texts(300)
    write_parquet(tmp_path / "a.parquet", {"id": list(range(300)), "text": t})
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in t))
    pdocs, _ = read_docs([tmp_path / "a.parquet"])
    jdocs, _ = read_docs([tmp_path / "a.jsonl"])
    assert pdocs == jdocs and len(pdocs) == 300        # ordinal = row = line number, from 1
    # --text-key picks another column; --format parquet works without the extension
    write_parquet(tmp_path / "b.bin", {"body": t[:5]})
    docs, _ = read_docs([tmp_path / "b.bin"], text_key="body", input_format="parquet")
    assert [d for _, d in docs] == t[:5]


def test_parquet_is_read_in_record_batches(tmp_path, monkeypatch):
    """Memory stays bounded: pyarrow hands over BATCH_ROWS rows at a time, never the table."""
    import data_prep.parquet as pqmod

    write_parquet(tmp_path / "a.parquet", {"text": texts(1000)}, row_group_size=250)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        for b in real(self, *a, **kw):
            sizes.append(b.num_rows)
            yield b
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pqmod, "BATCH_ROWS", 100)
    docs, _ = read_docs([tmp_path / "a.parquet"])
    assert len(docs) == 1000 and max(sizes) == 100 and len(sizes) == 10


def test_parquet_bad_input_counted_or_refused(tmp_path):
    write_parquet(tmp_path / "nulls.parquet", {"text": ["good one", None, "", "  ", "fine"]})
    write_parquet(tmp_path / "nocol.parquet", {"body": ["x", "y"]})
    write_parquet(tmp_path / "ints.parquet", {"text": [1, 2, 3]})
    docs, sk = read_docs([tmp_path])
    assert [d for _, d in docs] == ["good one", "fine"]
    assert sk.counts["parquet_non_string"] == 1 + 3      # the null, and the int column's rows
    assert sk.counts["parquet_missing_column"] == 1
    assert sk.counts["empty_documents"] == 2
    for name, msg in [("nulls.parquet", "nulls.parquet:row 2: column 'text' is null"),
                      ("nocol.parquet", "nocol.parquet: no column 'text'"),
                      ("ints.parquet", "ints.parquet: column 'text' holds int64, not strings")]:
        with pytest.raises(DataPrepError, match=msg):
            read_docs([tmp_path / name], strict=True)


def test_corrupt_parquet_names_the_file(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"text": texts(2000)}, row_group_size=500)
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.parquet").write_text("this is not parquet at all\n")
    bad = bytearray(data)
    bad[len(bad) // 3: len(bad) // 3 + 200] = b"\xff" * 200     # a damaged column chunk
    (tmp_path / "flipped.parquet").write_bytes(bytes(bad))
    for name in ("cut.parquet", "fake.parquet", "flipped.parquet"):
        r = subprocess.run([sys.executable, "-m", "data_prep", "tokenizer", "--input",
                            str(tmp_path / name), "--out", str(tmp_path / "o"), "-q"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"{tmp_path / name}: not a readable Parquet file" in r.stderr, r.stderr


def test_parquet_shards_match_jsonl_shards(tmp_path, tok):
    t = texts(500, seed=3)
    (tmp_path / "p").mkdir()
    (tmp_path / "j").mkdir()
    # the same identity ("data") for both, so the split hash puts the same rows/lines in val
    write_parquet(tmp_path / "p" / "data", {"text": t})
    (tmp_path / "j" / "data").write_text("".join(json.dumps({"text": x}) + "\n" for x in t))
    mp = build_shards([str(tmp_path / "p")], tok, tmp_path / "dp", seq_len=32, val_fraction=0.1,
                      read_options=ReadOptions(input_format="parquet"))
    mj = build_shards([str(tmp_path / "j")], tok, tmp_path / "dj", seq_len=32, val_fraction=0.1,
                      read_options=ReadOptions(input_format="jsonl"))
    assert mp["totals"] == mj["totals"] and mp["totals"]["val"]["documents"] > 0
    # the split hashes (identity, row): same rows as the JSONL lines, so the same tokens
    for sp, sj in zip(mp["shards"], mj["shards"]):
        assert sp["sha256"] == sj["sha256"]
    assert verify_dataset(tmp_path / "dp")["ok"]


# ----------------------------------------------------------------------------- compressed JSONL
@pytest.mark.parametrize("suffix,compress", [
    (".jsonl.gz", gzip.compress), (".jsonl.xz", lzma.compress), (".jsonl.bz2", bz2.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_compressed_jsonl_same_rules_as_plain(tmp_path, suffix, compress):
    lines = [json.dumps({"text": x}) for x in texts(200)]
    lines[5] = "{not json"
    lines[9] = json.dumps({"body": "no text key"})
    lines[12] = json.dumps({"text": 42})
    lines[20] = json.dumps({"text": "  "})
    lines[30] = json.dumps({"text": "lone \ud800 surrogate"})
    blob = ("\n".join(lines) + "\n").encode("utf-8")
    (tmp_path / "plain.jsonl").write_bytes(blob)
    (tmp_path / ("c" + suffix)).write_bytes(compress(blob))
    pdocs, psk = read_docs([tmp_path / "plain.jsonl"])
    cdocs, csk = read_docs([tmp_path / ("c" + suffix)])
    assert cdocs == pdocs and len(cdocs) == 196
    assert csk.counts == psk.counts
    for kind in ("json_errors", "json_missing_key", "json_non_string", "empty_documents",
                 "invalid_unicode"):
        assert csk.counts[kind] == 1, kind
    with pytest.raises(DataPrepError, match=rf"c{suffix}:6: not valid JSON"):
        read_docs([tmp_path / ("c" + suffix)], strict=True)
    cut = compress(blob)
    (tmp_path / ("cut" + suffix)).write_bytes(cut[: len(cut) // 2])
    with pytest.raises(DataPrepError, match=rf"cut{suffix}: the \w+ stream is truncated"):
        read_docs([tmp_path / ("cut" + suffix)])


# ----------------------------------------------------------------------------- foreign tokenizers
@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """A SentencePiece model trained here with Llama-2's ids: unk 0, bos 1, eos 2, no pad."""
    root = tmp_path_factory.mktemp("llama")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts(600, seed=1)), model_prefix=str(root / "m"), vocab_size=350,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=False, minloglevel=2, hard_vocab_limit=False)
    return root / "m.model"


def test_foreign_special_ids_are_recorded_and_used(tmp_path, llama_style):
    sp = spm.SentencePieceProcessor(model_file=str(llama_style))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    t = texts(200, seed=5)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in t))
    m = build_shards([str(tmp_path / "c.jsonl")], llama_style, tmp_path / "ds", seq_len=64,
                     val_fraction=0.0)
    tk = m["tokenizer"]
    assert (tk["pad_id"], tk["unk_id"], tk["bos_id"], tk["eos_id"]) == (-1, 0, 1, 2)
    assert tk["byte_fallback_ids"] == [min(i for i in range(sp.get_piece_size()) if sp.is_byte(i)),
                                       max(i for i in range(sp.get_piece_size()) if sp.is_byte(i))]
    assert verify_dataset(tmp_path / "ds")["ok"]
    # the stream is each document followed by the model's EOS (2), never our 3
    stream = []
    for sh in m["shards"]:
        for i, s in enumerate(wds.WebDataset(str(tmp_path / "ds" / sh["name"]), shardshuffle=False)):
            arr = np.load(io.BytesIO(s["tokens.npy"])).tolist()
            stream.extend(arr if not stream else arr[1:])
    want = []
    for x in t:
        want += sp.encode(x) + [2]
    assert stream == want[:len(stream)] and len(want) - len(stream) < 64
    assert m["totals"]["train"]["unk_tokens"] == 0


def test_model_without_eos_is_refused(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts(300)), model_prefix=str(tmp_path / "m"), vocab_size=300,
        byte_fallback=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2,
        hard_vocab_limit=False)
    (tmp_path / "c.txt").write_text("hello")
    with pytest.raises(DataPrepError, match="defines no EOS piece"):
        build_shards([str(tmp_path / "c.txt")], tmp_path / "m.model", tmp_path / "ds")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(DataPrepError, match="not a SentencePiece model"):
        build_shards([str(tmp_path / "c.txt")], tmp_path / "junk.model", tmp_path / "ds")


def test_tokenizer_dir_gives_absolute_path_sha_and_a_copy(tmp_path, tok, monkeypatch):
    (tmp_path / "c.txt").write_text("\n\n".join(texts(100)))
    monkeypatch.chdir(tok.parent.parent)
    m = build_shards([str(tmp_path / "c.txt")], tok.parent.name, tmp_path / "ds", seq_len=16,
                     val_fraction=0.0)       # --tokenizer DIR, relative to the working directory
    assert m["tokenizer"]["path"] == str(tok.resolve()) and os.path.isabs(m["tokenizer"]["path"])
    assert m["tokenizer"]["sha256"] == file_sha256(tok)
    copy = tmp_path / "ds" / m["tokenizer"]["copy"]
    assert copy.read_bytes() == tok.read_bytes()
    assert verify_dataset(tmp_path / "ds")["ok"]
