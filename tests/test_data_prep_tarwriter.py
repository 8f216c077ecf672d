"""`llp-prep` writes WebDataset tars with the standard library (data_prep/tarwriter.py), byte-identical
to webdataset.TarWriter's, and never imports torch (webdataset's import of it cost every array task
and the merge about 2 CPU-seconds; issue 14 section 5)."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.tarwriter import SampleTarWriter
from prep_fixtures import write_corpus

REPO = Path(__file__).resolve().parents[1]


def _samples():
    rng = np.random.default_rng(0)
    for i in range(7):
        buf = io.BytesIO()
        np.save(buf, rng.integers(0, 500, size=33).astype(np.uint16), allow_pickle=False)
        meta = json.dumps({"split": "train", "index": i, "name": "é" * i}).encode()
        yield f"train_{i:010d}", {"tokens.npy": buf.getvalue(), "json": meta}


def test_same_bytes_as_webdataset_tarwriter():
    ours, theirs = io.BytesIO(), io.BytesIO()
    w = SampleTarWriter(ours, mtime=1_000_000, user="llp", group="llp", mode=0o444)
    tw = wds.TarWriter(theirs, encoder=False, mtime=1_000_000, user="llp", group="llp", mode=0o444)
    tw.tarstream.format = tarfile.USTAR_FORMAT
    for key, members in _samples():
        w.write(key, members)
        tw.write({"__key__": key, **members})
    w.close()
    tw.close()
    assert ours.getvalue() == theirs.getvalue() and len(ours.getvalue()) > 7 * 1024
    # and webdataset reads it back
    got = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(
        [{"url": "mem", "stream": io.BytesIO(ours.getvalue())}])))
    assert [g["__key__"] for g in got] == [k for k, _ in _samples()]
    with pytest.raises(ValueError, match="dot"):
        SampleTarWriter(io.BytesIO(), 0, "a", "b").write("a.b", {"json": b"{}"})


@pytest.mark.timeout(300)
def test_shard_and_merge_do_not_import_torch(tmp_path):
    """A 2-task array and its merge in one fresh interpreter: torch is never imported."""
    corpus = write_corpus(tmp_path / "corpus", files=4, chapters=60)
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from data_prep import ReadOptions, build_shards, train_tokenizer
from data_prep.array import merge_parts
root = Path({str(tmp_path)!r})
corpus = Path({str(corpus)!r})
opts = ReadOptions(doc_sep="blank-line")
train_tokenizer([str(corpus)], root / "tok", vocab_size=400, read_options=opts)
for i in range(2):
    build_shards([str(corpus)], root / "tok", root / "ds", seq_len=64, val_fraction=0.05, samples_per_shard=20,
                 read_options=opts, num_tasks=2, task_index=i, quiet=True)
merge_parts(root / "ds")
print("TORCH" if "torch" in sys.modules or "webdataset" in sys.modules else "NO-TORCH")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "NO-TORCH"
    assert sorted(x.name for x in (tmp_path / "ds").glob("train-*.tar"))
