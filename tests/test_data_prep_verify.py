"""``llp-prep verify`` catches corruption (flipped byte, truncation, missing shard, duplicate key);
``llp-prep stats`` reports the manifest's numbers."""
import gzip
import json
import shutil
import tarfile

import pytest
import webdataset as wds

from data_prep import (BUNDLED_CORPUS, DataPrepError, ReadOptions, build_shards, train_tokenizer,
                       verify_dataset)
from data_prep.cli import main as cli_main
from data_prep.stats import dataset_stats

BLANK = ReadOptions(doc_sep="blank-line")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    corpus = root / "kjv_part.txt"
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        corpus.write_text(f.read(60_000), encoding="utf-8")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=600, read_options=BLANK)
    out = root / "ds"
    m = build_shards([str(corpus)], root / "tok" / "tokenizer.model", out, seq_len=32,
                     val_fraction=0.2, samples_per_shard=40, read_options=BLANK)
    assert len([s for s in m["shards"] if s["split"] == "train"]) >= 3
    assert any(s["split"] == "val" for s in m["shards"])
    return out


@pytest.fixture
def ds(template, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(template, out)
    return out


def member_offset(path, name):
    with tarfile.open(path) as tf:
        return tf.getmember(name).offset_data


def test_intact_dataset_verifies(ds, capsys):
    r = verify_dataset(ds)
    assert r["ok"] and not r["errors"]
    m = json.loads((ds / "manifest.json").read_text())
    assert r["samples"] == sum(s["samples"] for s in m["shards"])
    assert r["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert cli_main(["verify", str(ds)]) == 0
    assert "OK:" in capsys.readouterr().out


def test_flipped_token_byte_names_shard_and_sample(ds, capsys):
    shard = ds / "train-000001.tar"
    off = member_offset(shard, "train_0000000043.tokens.npy") + 128 + 20  # inside the array
    data = bytearray(shard.read_bytes())
    data[off] ^= 0x01
    shard.write_bytes(bytes(data))
    r = verify_dataset(ds)
    assert not r["ok"]
    text = "\n".join(r["errors"])
    assert "shard train-000001.tar: sha256 differs" in text
    assert "shard train-000001.tar sample train_0000000043: tokens differ" in text
    assert cli_main(["verify", str(ds)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "train_0000000043" in out


def test_flipped_header_byte_is_caught(ds):
    shard = ds / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[512 * 4 + 10] ^= 0x20   # the name field of the third member's header
    shard.write_bytes(bytes(data))
    r = verify_dataset(ds)
    assert not r["ok"]
    assert any("train-000000.tar" in e for e in r["errors"])


def test_truncated_shard(ds):
    shard = ds / "train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    r = verify_dataset(ds)
    assert not r["ok"]
    text = "\n".join(r["errors"])
    assert "train-000002.tar" in text
    assert "truncated" in text
    assert "holds" in text and "samples, manifest says 40" in text


def test_missing_shard(ds):
    (ds / "val-000000.tar").unlink()
    r = verify_dataset(ds)
    assert not r["ok"]
    assert any(e.startswith("shard val-000000.tar: missing") for e in r["errors"])


def test_duplicate_key(ds):
    first = ds / "train-000000.tar"
    second = ds / "train-000001.tar"
    samples = list(wds.WebDataset(str(second), shardshuffle=False))
    dup = next(iter(wds.WebDataset(str(first), shardshuffle=False)))
    with open(second, "wb") as f:
        tw = wds.TarWriter(f, encoder=False, mtime=0)
        for s in samples[:-1] + [dup]:
            tw.write({k: v for k, v in s.items() if k in ("__key__", "tokens.npy", "json")})
        tw.close()
    r = verify_dataset(ds)
    assert not r["ok"]
    assert any("sample train_0000000000: duplicate key (also in shard train-000000.tar)" in e
               for e in r["errors"])


def test_no_manifest_is_a_user_error(tmp_path, capsys):
    with pytest.raises(DataPrepError, match="holds no finished dataset"):
        verify_dataset(tmp_path)
    assert cli_main(["verify", str(tmp_path)]) == 2
    assert "holds no finished dataset" in capsys.readouterr().err


def test_stats(ds, capsys):
    st = dataset_stats(ds)
    m = json.loads((ds / "manifest.json").read_text())
    for split in ("train", "val"):
        t = m["totals"][split]
        s = st["splits"][split]
        assert s["bytes_per_token"] == pytest.approx(t["text_bytes"] / t["text_tokens"])
        assert s["tokens_per_document"] == pytest.approx(t["text_tokens"] / t["documents"])
        assert s["unk_rate"] == 0.0
        assert 2.0 < s["bytes_per_token"] < 5.0   # English text, 600 pieces: merges, not bytes
    assert cli_main(["stats", str(ds)]) == 0
    out = capsys.readouterr().out
    assert f"{m['totals']['train']['documents']:,}" in out and "bytes/tok" in out
    assert cli_main(["stats", str(ds), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"]["samples"] == \
        m["totals"]["val"]["samples"]


def test_cli_errors_exit_2(tmp_path, capsys):
    rc = cli_main(["shard", "--input", str(tmp_path / "missing.txt"), "--tokenizer",
                   str(tmp_path / "tok"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err
