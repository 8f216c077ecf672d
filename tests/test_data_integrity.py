"""The loader does not trust shard bytes (issue 16 §5): real WebDataset tars corrupted on disk.

Each kind of damage found by the adversarial trial, kept as a reproducing test:

* an in-vocabulary bit flip in a sample's tokens (trained silently before): the per-sample blake2b
  checksum that ``llp-prep`` writes into the sample's json catches it;
* a token id >= the vocabulary (an ``IndexError`` 24 steps later, no shard named);
* a corrupt tar header in the middle of a shard (tarfile then ends the shard silently);
* a truncated shard and an empty shard (a DataLoader worker traceback before);
* a shard holding more or fewer samples than the manifest lists.

Every failure is one line naming the shard and the sample; ``data.on_corrupt=skip`` logs, counts and
drops the damaged samples instead. The end-to-end tests run ``llp-pretrain train`` (one process with a
DataLoader worker, and two gloo processes under torchrun) and check that every process ends promptly
with that line and no traceback.
"""
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from llp_pretrain.data import (CorruptDataError, SampleSpec, TrainStream, check_sample, list_shards,
                               make_train_loader, read_shard, read_split_stream)
from tiny_runs import tiny_run_config, write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50


def _dataset(path: Path, train=(6, 6, 6, 6), val=(5, 5)) -> Path:
    write_tiny_dataset(path, seq_len=16, train_samples=list(train), val_samples=list(val), vocab_size=VOCAB)
    return path


def _member(shard: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(shard) as tf:
        return tf.getmember(name)


def _patch(shard: Path, offset: int, data: bytes) -> None:
    b = bytearray(shard.read_bytes())
    b[offset:offset + len(data)] = data
    shard.write_bytes(bytes(b))


def _token_offset(shard: Path, key: str, position: int) -> int:
    """File offset of token ``position`` of sample ``key``'s tokens.npy in ``shard``."""
    m = _member(shard, f"{key}.tokens.npy")
    with open(shard, "rb") as f:
        f.seek(m.offset_data)
        raw = f.read(m.size)
    header = m.size - len(np.load(io.BytesIO(raw)).tobytes())
    return m.offset_data + header + 2 * position  # uint16 tokens


def flip_in_vocab(shard: Path, key: str) -> None:
    """Flip the lowest bit of one token so that it stays a valid id (< VOCAB)."""
    for pos in range(17):
        off = _token_offset(shard, key, pos)
        b = shard.read_bytes()
        v = int.from_bytes(b[off:off + 2], "little")
        if (v ^ 1) < VOCAB:
            _patch(shard, off, (v ^ 1).to_bytes(2, "little"))
            return
    raise AssertionError("no token to flip")


def set_token(shard: Path, key: str, value: int) -> None:
    _patch(shard, _token_offset(shard, key, 3), value.to_bytes(2, "little"))


def corrupt_header(shard: Path, key: str) -> None:
    """Damage the tar header of ``key``'s first member (its checksum no longer matches)."""
    m = _member(shard, f"{key}.json")
    _patch(shard, m.offset + 10, b"\xff\xfe\xfd")


def _keys_of(shard: Path):
    with tarfile.open(shard) as tf:
        return sorted({n.split(".")[0] for n in tf.getnames()})


def _spec(ds: Path, verify=True) -> SampleSpec:
    return SampleSpec.from_manifest(json.loads((ds / "manifest.json").read_text()), verify)


def _read(ds: Path, name: str, policy="fail", verify=True, counter=None):
    shard = next(s for s in list_shards(str(ds), name.split("-")[0]) if s.name == name)
    first = 0 if name.endswith("000000.tar") else None
    return list(read_shard(shard, _spec(ds, verify), policy, first, counter))


def _one_line(msg: str, *must):
    assert "\n" not in msg and "Traceback" not in msg, msg
    for m in must:
        assert m in msg, msg


# ----------------------------------------------------------------------------------- read_shard
def test_clean_shard_reads_every_sample(tmp_path):
    ds = _dataset(tmp_path / "ds")
    out = _read(ds, "train-000000.tar")
    assert [k for k, _ in out] == [f"train-000000.tar/{k}" for k in _keys_of(ds / "train-000000.tar")]
    assert all(a.dtype == np.uint16 and a.shape == (17,) for _, a in out)


def test_in_vocab_bit_flip_is_caught_by_the_checksum(tmp_path):
    ds = _dataset(tmp_path / "ds")
    shard = ds / "train-000000.tar"
    key = _keys_of(shard)[2]
    flip_in_vocab(shard, key)
    with pytest.raises(CorruptDataError) as e:
        _read(ds, shard.name)
    _one_line(str(e.value), f"shard train-000000.tar sample {key}", "checksum")
    # without checksums the flipped id is valid: nothing else could have caught it
    assert len(_read(ds, shard.name, verify=False)) == 6
    # skip: the sample is dropped, counted, and the others are delivered
    counter = [0]
    out = _read(ds, shard.name, "skip", counter=counter)
    assert counter == [1] and len(out) == 5 and not any(k.endswith(key) for k, _ in out)


def test_token_id_out_of_vocabulary(tmp_path):
    ds = _dataset(tmp_path / "ds")
    shard = ds / "train-000001.tar"
    key = _keys_of(shard)[4]
    set_token(shard, key, VOCAB + 7)
    for verify in (True, False):  # the vocabulary check does not depend on the checksum
        with pytest.raises(CorruptDataError) as e:
            _read(ds, shard.name, verify=verify)
        _one_line(str(e.value), f"shard train-000001.tar sample {key}", f"token id {VOCAB + 7} >= vocabulary size {VOCAB}")


def test_corrupt_tar_header_does_not_end_the_shard_silently(tmp_path):
    ds = _dataset(tmp_path / "ds")
    shard = ds / "train-000002.tar"
    keys = _keys_of(shard)
    corrupt_header(shard, keys[3])
    with pytest.raises(CorruptDataError) as e:
        _read(ds, shard.name)
    _one_line(str(e.value), "shard train-000002.tar", f"after sample {keys[2]}", "holds 3 samples", "lists 6")
    counter = [0]
    assert [k.split("/")[1] for k, _ in _read(ds, shard.name, "skip", counter=counter)] == keys[:3]
    assert counter == [3]


def test_truncated_and_empty_shards(tmp_path):
    ds = _dataset(tmp_path / "ds")
    t, e = ds / "train-000000.tar", ds / "train-000003.tar"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    e.write_bytes(b"")
    with pytest.raises(CorruptDataError) as err:
        _read(ds, t.name)
    _one_line(str(err.value), "shard train-000000.tar", "truncated")
    with pytest.raises(CorruptDataError) as err:
        _read(ds, e.name)
    _one_line(str(err.value), "shard train-000003.tar", "before its first sample")
    counter = [0]
    assert _read(ds, e.name, "skip", counter=counter) == [] and counter == [6]


def test_sample_count_differs_from_the_manifest(tmp_path):
    ds = _dataset(tmp_path / "ds")
    m = json.loads((ds / "manifest.json").read_text())
    m["shards"][0]["samples"] = 7   # the shard holds 6
    m["shards"][1]["samples"] = 5   # the shard holds 6
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptDataError) as e:
        _read(ds, "train-000000.tar")
    _one_line(str(e.value), "shard train-000000.tar", "holds 6 samples but the manifest lists 7")
    with pytest.raises(CorruptDataError) as e:
        _read(ds, "train-000001.tar")
    _one_line(str(e.value), "shard train-000001.tar sample train_00000011", "more than the 5 samples")


def test_sample_moved_to_another_position_is_caught(tmp_path):
    """A valid sample in the wrong place (duplicated/reordered shard content) passes the checksum but
    not the index check."""
    ds = _dataset(tmp_path / "ds")
    shard = list_shards(str(ds), "train")[1]
    spec = _spec(ds)
    with pytest.raises(CorruptDataError) as e:
        list(read_shard(shard, spec, "fail", first_index=0))  # shard 1 starts at index 6
    _one_line(str(e.value), "shard train-000001.tar sample train_00000006", "expected 0")


def test_check_sample_dtype_and_length(tmp_path):
    spec = SampleSpec(seq_len=16, dtype=np.dtype(np.uint16), vocab=VOCAB, verify_checksums=False)

    def npy(a):
        b = io.BytesIO()
        np.save(b, a)
        return b.getvalue()

    for arr, what in ((np.zeros(17, np.uint32), "uint32[17]"), (np.zeros(16, np.uint16), "uint16[16]")):
        with pytest.raises(CorruptDataError) as e:
            check_sample({"__key__": "k1", "tokens.npy": npy(arr)}, spec, "train-000009.tar")
        _one_line(str(e.value), "shard train-000009.tar sample k1", what)
    with pytest.raises(CorruptDataError) as e:
        check_sample({"__key__": "k2", "tokens.npy": b"\x93NUMPY garbage"}, spec, "s.tar")
    _one_line(str(e.value), "shard s.tar sample k2", "does not decode")
    with pytest.raises(CorruptDataError) as e:
        check_sample({"__key__": "k3", "json": b"{}"}, spec, "s.tar")
    _one_line(str(e.value), "sample k3", "no tokens.npy")


def test_split_stream_for_evaluation_is_checked(tmp_path):
    ds = _dataset(tmp_path / "ds")
    flip_in_vocab(ds / "val-000001.tar", _keys_of(ds / "val-000001.tar")[0])
    assert len(read_split_stream(str(ds), "val", max_samples=5)) == 5 * 16 + 1  # damage not reached yet
    with pytest.raises(CorruptDataError) as e:
        read_split_stream(str(ds), "val")
    _one_line(str(e.value), "shard val-000001.tar sample val_00000005", "checksum")


# ----------------------------------------------------------------------------------- TrainStream
def _batches(ds, n, workers=1, policy="fail", consumed=0, dp=(1, 0)):
    """``n`` micro-batches of 2 (one step each: global batch 2 x dp), from data position ``consumed``."""
    s = TrainStream(str(ds), 2 * dp[0], 2, dp[0], dp[1], workers, seed=3, shuffle_buffer=4, start_step=consumed,
                    on_corrupt=policy)
    return list(itertools.islice(make_train_loader(s), n))


@pytest.mark.timeout(120)
def test_worker_error_is_one_line_in_the_trainer_process(tmp_path):
    ds = _dataset(tmp_path / "ds")
    key = _keys_of(ds / "train-000002.tar")[1]
    flip_in_vocab(ds / "train-000002.tar", key)
    for workers in (0, 2):
        with pytest.raises(CorruptDataError) as e:
            _batches(ds, 40, workers)
        _one_line(str(e.value), f"shard train-000002.tar sample {key}")
        assert "DataLoader worker" not in str(e.value)


@pytest.mark.timeout(120)
def test_skip_policy_keeps_streaming_and_resumes_exactly(tmp_path):
    ds = _dataset(tmp_path / "ds")
    bad = {_keys_of(ds / "train-000001.tar")[0], _keys_of(ds / "train-000003.tar")[5]}
    flip_in_vocab(ds / "train-000001.tar", sorted(bad)[0])
    set_token(ds / "train-000003.tar", sorted(bad)[1], 60000)
    full = _batches(ds, 40, workers=2, policy="skip")          # 80 samples: over 3 epochs of 22 good ones
    keys = [k for b in full for k in b["keys"]]
    assert not any(k.split("/")[1] in bad for k in keys)
    assert full[-1]["skipped"] > 0
    assert len(set(keys)) == 22                                # every good sample is still read
    # resuming anywhere (also past whole epochs) continues the same sequence
    for consumed in (3, 11, 25):
        again = _batches(ds, 40 - consumed, workers=2, policy="skip", consumed=consumed)
        assert [b["keys"] for b in again] == [b["keys"] for b in full[consumed:]], consumed


@pytest.mark.timeout(60)
def test_skip_policy_with_nothing_left_fails_instead_of_spinning(tmp_path):
    ds = _dataset(tmp_path / "ds", train=(3,))
    for k in _keys_of(ds / "train-000000.tar"):
        flip_in_vocab(ds / "train-000000.tar", k)
    with pytest.raises(CorruptDataError) as e:
        _batches(ds, 2, workers=0, policy="skip")
    _one_line(str(e.value), "every sample of shards ['train-000000.tar'] failed validation")


# ----------------------------------------------------------------------------------- end to end
def _write_cfg(tmp_path, ds, **data):
    raw = tiny_run_config(ds, tmp_path / "run", data={"num_workers": 1, **data}, train={"max_steps": 14})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(300)
def test_train_fails_with_one_line_and_skip_trains_on(tmp_path):
    ds = _dataset(tmp_path / "ds")
    key = _keys_of(ds / "train-000003.tar")[2]
    flip_in_vocab(ds / "train-000003.tar", key)
    cfg = _write_cfg(tmp_path, ds)
    p = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "train", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=240, env=_env(), cwd=REPO)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    _one_line(last, f"shard train-000003.tar sample {key}", "checksum")

    # skip, with 2 loader workers each meeting a bad sample (shards 0 and 3 go to different workers)
    flip_in_vocab(ds / "train-000000.tar", _keys_of(ds / "train-000000.tar")[4])
    p = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "train", "--config", str(cfg),
                        "--set", "data.on_corrupt=skip", "--set", "data.num_workers=2",
                        "--set", f"run.output_dir={tmp_path / 'run_skip'}"],
                       capture_output=True, text=True, timeout=240, env=_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"shard train-000003.tar sample {key}: tokens differ from the checksum" in p.stderr
    warned = p.stderr.count("skipped (data.on_corrupt=skip)")
    assert warned >= 2
    # the count also reaches TensorBoard (it was on stderr only): every log step, summed over workers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run_skip" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    counts = [e.value for e in ea.Scalars("data/skipped_samples")]
    assert len(counts) == 14 and counts == sorted(counts), counts
    assert 2 <= counts[-1] <= warned, (counts, warned)   # workers read ahead of the last step
    assert f"skipped samples {int(counts[-1])}" in p.stdout + p.stderr


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_corrupt_shard_on_one_rank_ends_both_ranks_promptly(tmp_path):
    """torchrun (the launchers' llp_pretrain.torchrun), 2 gloo processes: only rank 1 reads the damaged shard
    (shards go to rank i % 2)."""
    ds = _dataset(tmp_path / "ds")
    key = _keys_of(ds / "train-000001.tar")[0]
    set_token(ds / "train-000001.tar", key, 65000)
    cfg = _write_cfg(tmp_path, ds)
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "llp_pretrain.torchrun", "--standalone", "--nproc-per-node", "2",
                              "--log-dir", str(tmp_path / "ranks"), "--redirects", "3", "--tee", "3",
                              "-m", "llp_pretrain.cli", "train", "--config", str(cfg)],
                             stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True)
        try:
            rc = p.wait(timeout=240)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = log.read_text()
    assert rc != 0, out[-3000:]
    assert f"shard train-000001.tar sample {key}: token id 65000 >= vocabulary size {VOCAB}" in out, out[-3000:]
    assert "DataLoader worker" not in out, out[-3000:]
    # every rank ends with one line and no traceback: rank 1 names the sample, rank 0 (whose collective lost
    # its peer: a gloo traceback before) says that another process failed
    for rank, needle in ((1, f"shard train-000001.tar sample {key}"), (0, "another process of this job failed")):
        err = next((tmp_path / "ranks").glob(f"**/attempt_0/{rank}/stderr.log")).read_text()
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("llp-pretrain train: error:") and needle in last, (rank, last)
    # and the launchers' torchrun (llp_pretrain.torchrun) ends with one line, not ChildFailedError's traceback
    assert "Traceback" not in out, out[-3000:]
    assert "torchrun: error: llp_pretrain.cli: rank 1 failed first (exit code 2)" in out, out[-3000:]
