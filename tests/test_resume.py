"""Checkpoint bookkeeping: an interrupted save never becomes `latest`, retention, resume lookup, RNG.

(The end-to-end SIGKILL/SIGTERM resume runs real processes in ``test_engine.py``.)"""
import random

import numpy as np
import pytest
import torch

from llp_pretrain import checkpoint as ckpt
from llp_pretrain.engine import lr_at


def _fake_save(d, step, complete=True):
    tag = ckpt.tag_for(step)
    (d / tag).mkdir(parents=True)
    (d / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.finalize_save(d, tag, {"step": step}, keep=2)
    return tag


def test_interrupted_save_never_becomes_latest(tmp_path):
    d = tmp_path / "checkpoints"
    _fake_save(d, 4)
    _fake_save(d, 8, complete=False)  # killed while saving: DeepSpeed files, no run_meta.json
    assert ckpt.read_latest(d) == "step00000004"
    assert ckpt.resolve_resume("auto", d) == (d, "step00000004")
    with pytest.raises(FileNotFoundError, match="interrupted while saving"):
        ckpt.read_meta(d / "step00000008")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(d / "step00000008"), d)
    # a stale `latest` pointing at an incomplete tag is ignored too
    (d / "latest").write_text("step00000008\n")
    assert ckpt.read_latest(d) is None


def test_keep_last_k_and_cleanup(tmp_path):
    d = tmp_path / "checkpoints"
    _fake_save(d, 2, complete=False)
    for s in (4, 6, 8, 10):
        _fake_save(d, s)
    assert ckpt.complete_tags(d) == ["step00000008", "step00000010"]
    assert not (d / "step00000002").exists()  # incomplete and older than the latest: removed
    assert ckpt.read_latest(d) == "step00000010"


def test_resume_paths(tmp_path):
    run = tmp_path / "run"
    d = run / "checkpoints"
    _fake_save(d, 3)
    assert ckpt.resolve_resume(None, d) is None
    assert ckpt.resolve_resume("auto", tmp_path / "other" / "checkpoints") is None  # fresh start
    assert ckpt.resolve_resume(str(run), d) == (d, "step00000003")
    assert ckpt.resolve_resume(str(d), d) == (d, "step00000003")
    assert ckpt.resolve_resume(str(d / "step00000003"), d) == (d, "step00000003")
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_resume(str(tmp_path / "nope"), d)


def test_rng_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_rank_rng(tmp_path, 3)
    a = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert ckpt.load_rank_rng(tmp_path, 3)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not ckpt.load_rank_rng(tmp_path, 4)


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1)
    assert lrs[12] == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_lr_stays_continuous_when_max_steps_changes_on_resume():
    from types import SimpleNamespace

    from llp_pretrain.schedule import resumed_schedule, schedule_meta

    old = SimpleNamespace(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20)
    meta = {"step": 20, "schedule": schedule_meta(old, None)}
    longer = SimpleNamespace(**{**vars(old), "max_steps": 40})
    fn, anchor = resumed_schedule(longer, meta)
    # the finished run sat at min_lr; continuing longer must not re-warm (the closed form jumps back up)
    assert lr_at(20, 1.0, 0.1, 4, 40) == pytest.approx(0.628, abs=1e-3)
    assert anchor == {"step": 20, "lr": pytest.approx(0.1)}
    assert [fn(s) for s in (20, 30, 40)] == [pytest.approx(0.1)] * 3
    # mid-way: resume at step 12 of 20 with max_steps 30: continuous at 12, decays to min_lr at 30
    meta = {"step": 12, "schedule": schedule_meta(old, None)}
    fn, anchor = resumed_schedule(SimpleNamespace(**{**vars(old), "max_steps": 30}), meta)
    assert fn(12) == pytest.approx(lr_at(12, 1.0, 0.1, 4, 20))
    lrs = [fn(s) for s in range(12, 31)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    # the anchor is carried to a later resume with the same max_steps
    meta2 = {"step": 20, "schedule": schedule_meta(SimpleNamespace(**{**vars(old), "max_steps": 30}), anchor)}
    fn2, anchor2 = resumed_schedule(SimpleNamespace(**{**vars(old), "max_steps": 30}), meta2)
    assert anchor2 == anchor and fn2(25) == fn(25)
    # other schedule fields: refused with the way out
    with pytest.raises(ValueError, match="train.lr: 1.0 -> 2.0.*only train.max_steps may change"):
        resumed_schedule(SimpleNamespace(**{**vars(old), "lr": 2.0}), meta)


def test_damaged_run_meta_is_named(tmp_path):
    d = tmp_path / "checkpoints"
    tag = _fake_save(d, 2)
    for text in ("{not json", "[1, 2]", '{"step": "two"}', "\udcff"):
        (d / tag / "run_meta.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ValueError, match=r"step00000002/run_meta.json.*damaged"):
            ckpt.read_meta(d / tag)


def test_lost_or_forged_latest_never_restarts_a_run(tmp_path):
    """A missing `latest`, one naming a missing tag or a path outside the directory: `--resume auto`
    continues from the newest complete checkpoint instead of silently starting from step 0."""
    d = tmp_path / "checkpoints"
    _fake_save(d, 2)
    _fake_save(d, 4)
    (d / "latest").unlink()
    assert ckpt.resolve_resume("auto", d) == (d, "step00000004")
    for forged in ("step00000099", "../../other/checkpoints/step00000002", "step00000002/.."):
        (d / "latest").write_text(forged + "\n")
        assert ckpt.read_latest(d) is None
        assert ckpt.resolve_resume("auto", d) == (d, "step00000004")


def test_a_fifo_in_a_checkpoint_is_refused_not_read(tmp_path):
    import os

    tag = tmp_path / "step00000002"
    tag.mkdir()
    os.mkfifo(tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.UntrustedCheckpointError, match="mp_rank_00_model_states.pt: not a regular file"):
        ckpt.check_loadable(tag)


def test_one_training_per_run_directory(tmp_path):
    import subprocess
    import sys

    from llp_pretrain.run_identity import hold_run_lock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llp_pretrain.run_identity import "
                               f"hold_run_lock; hold_run_lock({str(run)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another training process \(pid {holder.pid}\)"):
            hold_run_lock(run)
    finally:
        holder.kill()
        holder.wait()
    hold_run_lock(run)  # released when its holder died
    hold_run_lock(run)  # the same process may start another training in it


def test_run_lock_is_not_held_by_a_killed_holders_forked_children(tmp_path):
    """Data-loader workers are forked from the trainer and outlive a SIGKILLed trainer by seconds;
    the resume started right after must not be refused because of them (CI saw exactly that)."""
    import os
    import signal
    import subprocess
    import sys

    from llp_pretrain.run_identity import hold_run_lock

    run = tmp_path / "run"
    code = ("import os, sys, time; from llp_pretrain.run_identity import hold_run_lock; "
            f"hold_run_lock({str(run)!r}); pid = os.fork()\n"
            "if pid == 0:\n    time.sleep(60); os._exit(0)\n"
            "print(pid, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        os.kill(child, 0)  # the forked child is still alive
        hold_run_lock(run)
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_exported_weights_that_are_not_safetensors_are_refused(tmp_path):
    import json
    import pickle

    from llp_pretrain.export import load_model

    (tmp_path / "model_config.json").write_text(json.dumps({"variant": "gpt", "vocab_size": 8, "d_model": 8,
                                                             "n_heads": 2, "n_layers": 1, "seq_len": 8}))
    from pathlib import Path

    class Planted:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    marker = tmp_path / "ran"
    with open(tmp_path / "model.safetensors", "wb") as f:
        pickle.dump({"x": Planted()}, f)
    with pytest.raises(ValueError, match="model.safetensors: not a valid safetensors file"):
        load_model(tmp_path)
    assert not marker.exists()
    (tmp_path / "model_config.json").write_text("{bad")
    with pytest.raises(ValueError, match="model_config.json: not valid JSON"):
        load_model(tmp_path)


def test_training_reads_manifests_with_the_checked_reader(tmp_path):
    from llp_pretrain.config import read_manifest

    for text, key in (("[1, 2]", "not an object"), ('{"format_version": 1, "seq_len": "32"}', "seq_len")):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=key):
            read_manifest(tmp_path)
