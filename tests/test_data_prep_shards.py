"""Sharding: plain-WebDataset read-back, lossless stream, determinism, splits, restarts."""
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import webdataset as wds

from data_prep import (BUNDLED_CORPUS, DataPrepError, ReadOptions, build_shards, train_tokenizer,
                       verify_dataset)
from data_prep import shards as shards_mod
from data_prep.errors import SkipCounter
from data_prep.inputs import discover, iter_documents

TRICKY = ("Tabs\tand  double  spaces,   triple.\nNewlines\n \nCafé naïve Ångström résumé\n"
          "Emoji 😀🚀👍🏽 CJK 中文字符 日本語のテキスト 한국어\r\n\ttrailing \n")
BLANK = ReadOptions(doc_sep="blank-line")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    corpus = root / "corpus"
    corpus.mkdir()
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        (corpus / "kjv_part.txt").write_text(f.read(120_000), encoding="utf-8")
    (corpus / "tricky.txt").write_text((TRICKY + "\n\n") * 3 + "x\n\n" + "   \n", encoding="utf-8")
    (corpus / "sub").mkdir()
    with gzip.open(corpus / "sub" / "more.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Another file.\n\nWith  two\tdocuments 😀.\n")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=800, read_options=BLANK)
    return {"root": root, "corpus": corpus, "model": root / "tok" / "tokenizer.model"}


def original_docs(corpus):
    docs, cur = [], []
    for _, _, piece, last in iter_documents(discover([str(corpus)]), BLANK, SkipCounter()):
        cur.append(piece)
        if last:
            docs.append("".join(cur))
            cur = []
    return docs


def build(env, out, **kw):
    args = dict(seq_len=64, val_fraction=0.2, samples_per_shard=25, read_options=BLANK)
    args.update(kw)
    return build_shards([str(env["corpus"])], env["model"], out, **args)


def read_split(out, manifest, split):
    """Samples of a split in stream order, read with plain webdataset (no project code)."""
    names = [s["name"] for s in manifest["shards"] if s["split"] == split]
    samples, per_shard = [], {}
    for name in names:
        ds = wds.WebDataset(str(out / name), shardshuffle=False)
        n = 0
        for s in ds:
            arr = np.load(io.BytesIO(s["tokens.npy"]))
            samples.append((s["__key__"], arr, json.loads(s["json"])))
            n += 1
        per_shard[name] = n
    return samples, per_shard


def test_webdataset_read_back_matches_manifest(env, tmp_path):
    out = tmp_path / "ds"
    m = build(env, out)
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["name"] for s in m["shards"]] + ["manifest.json", "tokenizer.model"])
    assert m["dtype"] == "uint16" and m["tokenizer"]["piece_count"] == 800
    for split in ("train", "val"):
        samples, per_shard = read_split(out, m, split)
        t = m["totals"][split]
        assert t["samples"] == len(samples) > 0
        assert t["tokens"] == sum(a.size for _, a, _ in samples)
        for sh in m["shards"]:
            if sh["split"] == split:
                assert per_shard[sh["name"]] == sh["samples"]
        for key, arr, meta in samples:
            assert "." not in key and arr.dtype == np.uint16 and arr.shape == (65,)
            assert meta["split"] == split
        assert len({k for k, _, _ in samples}) == len(samples)
    assert verify_dataset(out)["ok"]


def test_stream_is_lossless_and_json_offsets_are_right(env, tmp_path):
    out = tmp_path / "ds"
    m = build(env, out)
    docs = original_docs(env["corpus"])
    sp = spm.SentencePieceProcessor(model_file=str(env["model"]))
    seen_ids = {}
    for split in ("train", "val"):
        samples, _ = read_split(out, m, split)
        # consecutive samples share exactly one boundary token
        for (_, a, _), (_, b, _) in zip(samples, samples[1:]):
            assert a[-1] == b[0]
        stream = np.concatenate([samples[0][1]] + [a[1:] for _, a, _ in samples[1:]])
        assert stream.size == m["totals"][split]["stream_tokens"]
        assert 1 not in stream  # no unk id anywhere
        # every complete document decodes back to its exact text
        order = []
        for _, _, meta in samples:
            for doc_id, _, _ in meta["docs"]:
                if not order or order[-1] != doc_id:
                    order.append(doc_id)
        seen_ids[split] = set(order)
        cuts = np.flatnonzero(stream == 3)
        start = 0
        for doc_id, end in zip(order, cuts):
            assert sp.decode(stream[start:end].tolist()) == docs[doc_id]
            start = end + 1
        assert len(cuts) >= len(order) - 1
        # the json's [doc_id, offset, count] point at the right tokens
        for _, arr, meta in samples[:40]:
            pos = 0
            for doc_id, off, n in meta["docs"]:
                ids = sp.encode(docs[doc_id]) + [3]
                assert arr[pos:pos + n].tolist() == ids[off:off + n]
                pos += n
            assert pos == arr.size
    # the split is by document: no document in both
    assert seen_ids["train"] and seen_ids["val"]
    assert not seen_ids["train"] & seen_ids["val"]
    # tricky characters made it through (they are in the corpus several times)
    assert any(d.startswith("Tabs\t") for d in docs)


def test_workers_do_not_change_a_byte(env, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "BATCH_CHARS", 3000)  # many batches in flight
    outs = []
    for w, parallel in ((0, "processes"), (1, "processes"), (2, "processes"), (2, "threads")):
        out = tmp_path / f"w{w}{parallel}"
        build(env, out, workers=w, parallel=parallel)
        outs.append(out)
    a = outs[0]
    names = sorted(p.name for p in a.iterdir())
    assert len(names) > 3
    for b in outs[1:]:
        assert names == sorted(p.name for p in b.iterdir())
        for n in names:
            assert (a / n).read_bytes() == (b / n).read_bytes(), (b, n)


def test_split_depends_only_on_document_identity(env, tmp_path):
    m1 = build(env, tmp_path / "a")
    extra = tmp_path / "extra_corpus"
    extra.mkdir()
    for p in env["corpus"].rglob("*"):
        if p.is_file():
            dst = extra / p.relative_to(env["corpus"])
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    (extra / "aaa_first.txt").write_text("A new first file.\n\nIt shifts every doc id.\n")
    m2 = build_shards([str(extra)], env["model"], tmp_path / "b", seq_len=64, val_fraction=0.2,
                      samples_per_shard=25, read_options=BLANK)

    def val_texts(m, out, corpus):
        docs = original_docs(corpus)
        samples, _ = read_split(out, m, "val")
        return {docs[d] for _, _, meta in samples for d, _, _ in meta["docs"]}

    v1 = val_texts(m1, tmp_path / "a", env["corpus"])
    v2 = val_texts(m2, tmp_path / "b", extra)
    assert v1 and v1 <= v2


def test_empty_documents_never_make_samples(env, tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i, text in enumerate(["", " ", "\n", "a"]):
        (d / f"{i}.txt").write_text(text, encoding="utf-8")
    m = build_shards([str(d)], env["model"], tmp_path / "ds", seq_len=1, val_fraction=0.0)
    sp = spm.SentencePieceProcessor(model_file=str(env["model"]))
    assert m["skipped"]["empty_documents"] == 3
    assert m["totals"]["train"]["documents"] == 1
    samples, _ = read_split(tmp_path / "ds", m, "train")
    assert [a.tolist() for _, a, _ in samples] == [sp.encode("a") + [3]]
    # too few tokens for one sample: refused (it used to write a 0-sample dataset, exit 0)
    with pytest.raises(DataPrepError, match="no train samples") as e:
        build_shards([str(d)], env["model"], tmp_path / "ds2", seq_len=8, val_fraction=0.0)
    assert "empty_documents 3" in str(e.value)
    assert list((tmp_path / "ds2").iterdir()) == []


def test_different_dataset_refused_unless_overwrite(env, tmp_path):
    out = tmp_path / "ds"
    m1 = build(env, out, samples_per_shard=5)
    n1 = len(m1["shards"])
    with pytest.raises(DataPrepError) as e:
        build(env, out, seq_len=32)
    assert "--overwrite" in str(e.value) and "different dataset" in str(e.value)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == m1["fingerprint"]
    m2 = build(env, out, seq_len=128, samples_per_shard=50, overwrite=True)
    assert len(m2["shards"]) < n1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["name"] for s in m2["shards"]] + ["manifest.json", "tokenizer.model"])
    assert verify_dataset(out)["ok"]
    # the same command again: redone cleanly, same bytes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    build(env, out, seq_len=128, samples_per_shard=50)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_truncated_gzip_leaves_no_manifest_or_partial_file(env, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a_good.txt").write_text((BUNDLED_CORPUS.name + " text\n\n") * 2000, encoding="utf-8")
    data = gzip.compress(("more text here\n\n" * 20000).encode())
    (d / "b_cut.txt.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "ds"
    with pytest.raises(DataPrepError, match="b_cut.txt.gz"):
        build_shards([str(d)], env["model"], out, seq_len=16, samples_per_shard=50,
                     read_options=BLANK)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.partial"))
    with pytest.raises(DataPrepError, match="holds no finished dataset"):
        verify_dataset(out)


@pytest.mark.timeout(180)
def test_killed_run_is_redone_cleanly_by_the_same_command(env, tmp_path):
    out = tmp_path / "ds"
    exe = Path(sys.executable).with_name("llp-prep")
    cmd = [str(exe) if exe.exists() else sys.executable, "shard", "--input", str(BUNDLED_CORPUS),
           "--doc-sep", "blank-line", "--tokenizer", str(env["model"]), "--out", str(out),
           "--seq-len", "256", "--samples-per-shard", "50", "--val-fraction", "0.01", "--quiet",
           "--workers", "1"]
    if not exe.exists():
        cmd[1:1] = ["-m", "data_prep.cli"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # kill as soon as the first complete shard appears: 4 of the 5 input batches are still to do
    while time.time() < deadline and not (out / "train-000000.tar").exists():
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed: " + \
        proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert (out / ".llp-prep-run.json").exists()
    with pytest.raises(DataPrepError, match="holds no finished dataset"):
        verify_dataset(out)
    # same command again (in-process, same arguments): redone, complete and valid
    from data_prep.cli import main
    assert main(cmd[cmd.index("shard"):]) == 0
    r = verify_dataset(out)
    assert r["ok"], r["errors"][:5]
    assert not r["warnings"]
    assert not (out / ".llp-prep-run.json").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"]["train"]["samples"] > 1000 and m["totals"]["val"]["samples"] > 0
    argv = m["command"]["argv"]
    assert argv[0] == "shard" and "--quiet" not in argv and "--workers" not in argv
    assert argv == [a for a in cmd[cmd.index("shard"):] if a not in ("--quiet", "--workers", "1")]


def test_documents_streamed_in_pieces_stay_lossless(env, tmp_path, monkeypatch):
    from data_prep import inputs as inputs_mod

    monkeypatch.setattr(inputs_mod, "PIECE_CHARS", 40)
    monkeypatch.setattr(shards_mod, "PIECE_CHARS", 40)
    d = tmp_path / "c"
    d.mkdir()
    long_doc = "".join(f"line {i}\twith  spaces é 中 😀\n" for i in range(60)) + "no newline " * 30
    (d / "long.txt").write_text(long_doc, encoding="utf-8")
    (d / "one_line.txt").write_text("x" * 1000 + " end", encoding="utf-8")
    m = build_shards([str(d)], env["model"], tmp_path / "ds", seq_len=16, val_fraction=0.0)
    samples, _ = read_split(tmp_path / "ds", m, "train")
    stream = np.concatenate([samples[0][1]] + [a[1:] for _, a, _ in samples[1:]])
    sp = spm.SentencePieceProcessor(model_file=str(env["model"]))
    cut = int(np.flatnonzero(stream == 3)[0])
    assert sp.decode(stream[:cut].tolist()) == long_doc
    assert m["totals"]["train"]["text_bytes"] == len(long_doc.encode()) + 1004
    assert m["totals"]["train"]["documents"] == 2


def test_token_dtype_follows_piece_count():
    assert shards_mod.token_dtype(65536) == np.uint16
    assert shards_mod.token_dtype(65537) == np.uint32
    for dt in (np.uint16, np.uint32):
        arr = np.arange(9, dtype=dt) * 7000
        blob = shards_mod.npy_header(9, np.dtype(dt)) + arr.tobytes()
        back = np.load(io.BytesIO(blob))
        assert back.dtype == dt and back.tolist() == arr.tolist()


def test_out_inside_input_dir_is_refused_and_empty_val_warned(env, tmp_path, capsys):
    with pytest.raises(DataPrepError, match="inside the input directory"):
        build_shards([str(env["corpus"])], env["model"], env["corpus"] / "shards", seq_len=64)
    assert not (env["corpus"] / "shards").exists()
    f = tmp_path / "small.txt"
    f.write_text("".join(f"paragraph {i} of some text\n\n" for i in range(60)), encoding="utf-8")
    m = build_shards([str(f)], env["model"], tmp_path / "ds", seq_len=64, val_fraction=1e-9,
                     read_options=BLANK)
    assert m["totals"]["val"]["samples"] == 0
    assert "val split is empty" in capsys.readouterr().err


def test_progress_shows_rates_and_quiet_silences_it(env, tmp_path, capsys):
    from data_prep.cli import main

    base = ["shard", "--input", str(env["corpus"]), "--doc-sep", "blank-line", "--tokenizer",
            str(env["model"]), "--seq-len", "64", "--workers", "0", "--val-fraction", "0.2"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    assert "docs/s" in cap.err and "tokens/s" in cap.err and "100%" in cap.err
    assert "empty_documents" in cap.out and "dropped_tail_tokens" in cap.out
    assert main(base + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_sentencepiece_space_symbol_is_counted(env, tmp_path):
    # U+2581 is SentencePiece's own space symbol: the one character that cannot round-trip
    f = tmp_path / "s.txt"
    f.write_text("tok\u2581en and \u2581\u2581 more", encoding="utf-8")
    m = build_shards([str(f)], env["model"], tmp_path / "ds", seq_len=2, val_fraction=0.0)
    assert m["skipped"]["space_symbol_characters"] == 3
    samples, _ = read_split(tmp_path / "ds", m, "train")
    stream = np.concatenate([samples[0][1]] + [a[1:] for _, a, _ in samples[1:]])
    sp = spm.SentencePieceProcessor(model_file=str(env["model"]))
    assert sp.decode(stream.tolist()).startswith("tok en and    more")
