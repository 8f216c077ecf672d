"""Resume on another number of processes (issue 13, checkpoint side): real torchrun jobs on CPU/gloo.

One module fixture runs every training (4 process launches in all):

* job A, ``torchrun --nproc-per-node 2`` (dp 2): ZeRO-1 (fp32, bf16), ZeRO-3 and ZeRO-0 (fp32,
  bf16) runs of 8 planned steps stopped (checkpoint-and-stop) after step 4; a ZeRO-2 run stopped
  after step 4 and resumed at once as dp 1 x sp 2 (same world size: loads without conversion;
  scenario 3).
  And a ZeRO-1 run on dp 1 x sp 2 without dropout, stopped after step 4.
* a conversion of the ZeRO-1 checkpoint SIGKILLed halfway (fault injected at DeepSpeed's 6th
  ``torch.save``), leaving its ``.partial`` directory behind.
* job B, one process (world 1): the uninterrupted reference, those runs resumed on world 1
  (scenario 1; ZeRO-3 with a layout change; the killed conversion redone), a resume with another
  global batch size (refused), and a world-1 ZeRO-2 run stopped after step 4.
* job C, ``torchrun --nproc-per-node 4``: a resume whose conversion fails on rank 0 (every rank must
  fail, none hang), then that world-1 run resumed as dp 2 x sp 2 (scenario 2).

Asserted: every layout change continues the step counter and logs the uninterrupted run's LR at
every step (TensorBoard ``train/lr``); the fp32 master weights, Adam ``exp_avg``/``exp_avg_sq`` and
Adam step counts read with DeepSpeed's public ``safe_get_full_*`` right after the load on the new
layout equal (bit for bit) those right before the save on the old one; the multiset of sample keys
of every step (``data.log_consumed``, union over ranks) equals the uninterrupted run's; the final
training loss is within ``LOSS_TOL`` of it, and without dropout in fp32 the loss of every step agrees
to rel 1e-4 (not bit-equal: the reduction order of the gradient differs on another layout; with
dropout the masks are derived, not restored, on a new layout).
"""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tiny_runs import tiny_run_config, write_tiny_dataset
from llp_pretrain.training.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
HARNESS = str(REPO / "tests" / "train_many.py")

STEPS = 8
TAG = "step00000004"
DROPOUT = ("z1b", "z0", "z0b")
LOSS_TOL = 0.05  # absolute, on a loss of about ln(48) = 3.9 after 8 steps of a tiny model


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd, timeout):
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-6000:]}")
    return p.stdout + p.stderr


def _job(w, name, stage, mb, ga, sp=1, **extra):
    # runs without dropout are compared with the uninterrupted run step by step; with dropout (masks are
    # derived, not restored, on a new layout) and in bf16 only the final loss is compared
    cfg = tiny_run_config(w / "ds", w / name, deepspeed=f"configs/deepspeed/zero{stage}.json",
                          model={"dropout": 0.1 if name in DROPOUT else 0.0}, data={"log_consumed": True},
                          parallel={"sequence_parallel_size": sp},
                          train={"max_steps": STEPS, "micro_batch_size": mb, "grad_accum_steps": ga,
                                 "precision": "bf16" if name in ("z1b", "z0b") else "fp32"})
    return {"config": cfg, "result": str(w / f"res_{name}"), **extra}


def _stopped(w, name, stage, mb, ga, sp=1):
    """Planned for 8 steps, checkpoint-and-stop after step 4, states dumped there."""
    return _job(w, name, stage, mb, ga, sp, stop_after=4, dump_step=4, dump_path=str(w / f"{name}.saved.safetensors"))


def _resumed(w, name, stage, mb, ga, sp=1, tag="resumed"):
    return _job(w, name, stage, mb, ga, sp, resume="auto", dump_start=str(w / f"{name}.{tag}.safetensors"))


def _torchrun(n, spec, timeout):
    return _run([TORCHRUN, "--nproc-per-node", str(n), "--master-addr", "127.0.0.1", "--master-port",
                 str(free_port()), HARNESS, "train-many", str(spec)], timeout)


KILLER = """
import os, signal, sys, torch
from llp_pretrain.training.universal import convert_to_universal
real, n = torch.save, [0]
def save(*a, **k):  # SIGKILL this process at DeepSpeed's 6th file write: a conversion killed halfway
    n[0] += 1
    if n[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
torch.save = save
convert_to_universal(sys.argv[1])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    w = tmp_path_factory.mktemp("layout")
    write_tiny_dataset(w / "ds", seq_len=16, train_samples=[12, 12], val_samples=[4], vocab_size=48)
    logs = {}
    a = [_stopped(w, "z1", 1, 2, 1), _stopped(w, "z1b", 1, 2, 1), _stopped(w, "z3", 3, 2, 1),
         _stopped(w, "z0", 0, 2, 1), _stopped(w, "z0b", 0, 2, 1),
         _stopped(w, "sp", 2, 2, 1), _resumed(w, "sp", 2, 2, 2, sp=2), _stopped(w, "sq", 1, 2, 2, sp=2)]
    (w / "a.json").write_text(json.dumps(a))
    logs["a"] = _torchrun(2, w / "a.json", 900)

    killed = subprocess.run([PY, "-c", KILLER, str(w / "z1" / "checkpoints" / TAG)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    logs["killed"] = (killed.returncode, sorted(p.name for p in (w / "z1" / "checkpoints").iterdir()))

    b = [_job(w, "ref", 1, 2, 2),
         _resumed(w, "z1", 1, 2, 2), _resumed(w, "z1b", 1, 2, 2), _resumed(w, "z3", 3, 2, 2),
         {**_resumed(w, "z0", 0, 2, 1), "expect_error": True, "result": str(w / "res_gbs")},
         _resumed(w, "z0", 0, 4, 1), _resumed(w, "z0b", 0, 4, 1), _resumed(w, "sq", 1, 2, 2),
         _stopped(w, "w1", 2, 2, 2)]
    (w / "b.json").write_text(json.dumps(b))
    logs["b"] = _run([PY, HARNESS, "train-many", str(w / "b.json")], 900)

    # a copy of z3's step-4 tag whose model-state file is a valid torch file without DeepSpeed's keys:
    # it passes the scan, DeepSpeed's conversion fails on rank 0, every rank must end with an error
    broken = w / "broken" / "checkpoints"
    shutil.copytree(w / "z3" / "checkpoints" / TAG, broken / TAG)
    for f in (broken / TAG).glob("*model_states.pt"):
        torch.save({"module": {}}, f)
    (broken / "latest").write_text(TAG + "\n")
    c = [{**_resumed(w, "broken", 3, 2, 1, sp=2), "expect_error": True}, _resumed(w, "w1", 2, 2, 1, sp=2)]
    (w / "c.json").write_text(json.dumps(c))
    logs["c"] = _torchrun(4, w / "c.json", 900)
    return w, logs


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}


def _states(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _consumed(run_dir):
    """{step: sorted multiset of keys over all ranks} from ``RUN/consumed/rank*.jsonl``."""
    from llp_pretrain.training.consumed import read_log

    per_step = {}
    for f in sorted((Path(run_dir) / "consumed").glob("rank*.jsonl")):
        for line in read_log(f):
            per_step.setdefault(line["step"], Counter()).update(line["keys"])
    return per_step


def _assert_same_states(saved_path, loaded_path, adam_step=4):
    saved, loaded = _states(saved_path), _states(loaded_path)
    assert sorted(saved) == sorted(loaded)
    assert len([k for k in saved if k.endswith("/exp_avg_sq")]) > 10  # every parameter, every Adam state
    for k in saved:
        assert saved[k].shape == loaded[k].shape and torch.equal(saved[k], loaded[k]), k
    assert saved["adam_steps"].tolist() == [float(adam_step)]  # one count for all partitions, restored
    assert saved["global_steps"].tolist() == [4, 4]


@pytest.mark.distributed
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("name", ["z1", "z1b", "z3", "z0", "z0b", "sp", "w1", "sq"])
def test_layout_change_continues_steps_lr_and_exact_states(runs, name):
    """z1/z1b/z3: dp 2 -> world 1 (ZeRO-1 fp32/bf16, ZeRO-3; universal conversion); z0/z0b: ZeRO-0
    fp32/bf16 dp 2 -> 1 (the whole optimizer state is in one file: loaded as it is); sp: dp 2 x sp 1
    -> dp 1 x sp 2 (ZeRO-2, same world: loaded as it is); w1: world 1 -> dp 2 x sp 2 (ZeRO-2,
    universal conversion); sq: dp 1 x sp 2 -> world 1 (ZeRO-1, universal conversion)."""
    w, _ = runs
    # DeepSpeed's ZeRO-0 bf16 wrapper primes AdamW with one zero-gradient step at start-up: 4 + 1
    _assert_same_states(w / f"{name}.saved.safetensors", w / f"{name}.resumed.safetensors", 5 if name == "z0b" else 4)
    ref, got = _scalars(w / "ref", "train/lr"), _scalars(w / name, "train/lr")  # same schedule in bf16
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    assert got == ref  # the LR of every step, before and after the layout change
    res = json.loads((w / f"res_{name}.rank0.json").read_text())
    assert (res["step"], res["stopped_by"]) == (STEPS, "max_steps")
    ref_keys, got_keys = _consumed(w / "ref"), _consumed(w / name)
    assert sorted(ref_keys) == list(range(1, STEPS + 1))
    # sequence-parallel peers log the same keys: sp size before and after the change
    sp_before, sp_after = {"sp": (1, 2), "w1": (1, 2), "sq": (2, 1)}.get(name, (1, 1))
    assert got_keys == {s: Counter({k: n * (sp_after if s > 4 else sp_before) for k, n in c.items()})
                        for s, c in ref_keys.items()}  # none repeated, none skipped, before and after the change
    ref_loss = json.loads((w / "res_ref.rank0.json").read_text())["loss"]
    assert abs(res["loss"] - ref_loss) < LOSS_TOL, (res["loss"], ref_loss)
    if name not in DROPOUT:  # same samples, no dropout, fp32: only the order of floating-point sums differs
        ref_l, got_l = _scalars(w / "ref", "train/loss"), _scalars(w / name, "train/loss")
        for step in range(1, STEPS + 1):
            assert got_l[step] == pytest.approx(ref_l[step], rel=1e-4), (step, got_l[step], ref_l[step])
    converted = (w / name / "checkpoints" / f"{TAG}.universal").is_dir()
    assert converted == (name in ("z1", "z1b", "z3", "w1", "sq"))  # only another world size under ZeRO 1-3 converts


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_loss_continues_across_a_layout_change_with_the_same_samples(runs):
    """dp 1 x sp 2 for steps 1-4, converted, world 1 for steps 5-8: the same samples as the
    uninterrupted world-1 run (dp 1 both times), no dropout. Sequence parallelism changes only the
    order of floating-point sums, so every step's loss agrees to rel 1e-4 (the sequence-parallel
    tests bound one step at 1e-5; Adam carries differences forward)."""
    w, _ = runs
    ref, got = _scalars(w / "ref", "train/loss"), _scalars(w / "sq", "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got[step], ref[step])
    assert got[STEPS] < got[1]  # it trains


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_conversion_killed_halfway_is_redone_not_used(runs):
    w, logs = runs
    rc, names = logs["killed"]
    assert rc == -9, rc
    assert f".{TAG}.universal.partial" in names and f"{TAG}.universal" not in names
    ckpt = w / "z1" / "checkpoints"
    assert f"converted to {ckpt / (TAG + '.universal')}" in logs["b"]  # converted again, not reused
    assert not (ckpt / f".{TAG}.universal.partial").exists()
    assert json.loads((ckpt / f"{TAG}.universal" / "converted.json").read_text())["source"] == TAG


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_converted_copy_is_reused_and_the_original_untouched(runs):
    from llp_pretrain.training.universal import convert_to_universal

    w, _ = runs
    tag_dir = w / "w1" / "checkpoints" / TAG
    marker = w / "w1" / "checkpoints" / f"{TAG}.universal" / "converted.json"
    before = marker.stat().st_mtime_ns
    original = {p.name: p.stat().st_mtime_ns for p in tag_dir.iterdir()}
    out, converted = convert_to_universal(tag_dir)
    assert (out, converted) == (marker.parent, False)
    assert marker.stat().st_mtime_ns == before
    assert {p.name: p.stat().st_mtime_ns for p in tag_dir.iterdir()} == original


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_global_batch_size_change_is_refused_up_front(runs):
    w, _ = runs
    res = json.loads((w / "res_gbs.rank0.json").read_text())
    assert res["type"] == "ValueError"
    assert "global_batch_size=4" in res["error"] and "this run has 2" in res["error"]
    assert "--set train.global_batch_size=4" in res["error"]


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_planted_pickle_in_a_converted_copy_is_refused(runs):
    from llp_pretrain.checkpoint import UntrustedCheckpointError, check_loadable

    w, _ = runs
    copy = w / "z3" / "checkpoints" / f"{TAG}.universal" / TAG
    check_loadable(copy, recursive=True)  # DeepSpeed's own files pass

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    bad = copy / "zero" / "planted" / "fp32.pt"
    bad.parent.mkdir()
    torch.save({"param": Evil()}, bad)
    try:
        with pytest.raises(UntrustedCheckpointError, match="planted/fp32.pt.*could run code"):
            check_loadable(copy, recursive=True)
    finally:
        bad.unlink()
        bad.parent.rmdir()


def test_which_checkpoints_need_conversion(tmp_path):
    """Seconds: the decision alone. ZeRO 1-3 on another world size convert; the same world size and
    ZeRO-0 (one optimizer file) load as they are; a ZeRO-0 tag with per-rank optimizer files
    (DeepSpeed's BF16_Optimizer) is refused with the way out."""
    from llp_pretrain.training.universal import needs_universal

    def meta(stage, world):
        return {"zero_stage": stage, "layout": {"world_size": world}}

    for r in (0, 1):
        (tmp_path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert [needs_universal(meta(s, 2), 1, tmp_path) for s in (1, 2, 3)] == [True, True, True]
    assert [needs_universal(meta(s, 2), 2, tmp_path) for s in (0, 1, 2, 3)] == [False] * 4
    for f in tmp_path.iterdir():
        f.unlink()
    assert not needs_universal(meta(0, 2), 1, tmp_path)
    (tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="split over 2 ranks.*Relaunch with 2 processes.*ZeRO 1-3"):
        needs_universal(meta(0, 2), 4, tmp_path)
    assert not needs_universal(meta(0, 2), 2, tmp_path)


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_a_failed_conversion_ends_every_rank_and_leaves_nothing(runs):
    w, _ = runs
    res = [json.loads((w / f"res_broken.rank{r}.json").read_text()) for r in range(4)]
    assert all(r["type"] == "RuntimeError" for r in res), res
    assert "converting" in res[0]["error"] and "the checkpoint is unchanged" in res[0]["error"], res[0]
    assert all("failed on rank 0" in r["error"] for r in res[1:]), res
    assert sorted(p.name for p in (w / "broken" / "checkpoints").iterdir()) == ["latest", TAG]


def test_incomplete_checkpoint_is_refused_before_conversion(tmp_path):
    from llp_pretrain.training.universal import needs_universal

    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 1 ZeRO optimizer-state files .* written by 2 ranks"):
        needs_universal({"zero_stage": 1, "layout": {"world_size": 2}}, 1, tmp_path)


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_stale_or_unmarked_copies_are_converted_again(runs, tmp_path):
    """A copy is reused only when its marker names this save (sha256 of run_meta.json): a tag saved
    again under the same name, or a copy without marker, is converted afresh."""
    from llp_pretrain.training.universal import convert_to_universal, universal_dir

    w, _ = runs
    tag = tmp_path / "checkpoints" / TAG
    shutil.copytree(w / "z3" / "checkpoints" / TAG, tag)
    assert convert_to_universal(tag)[1] and not convert_to_universal(tag)[1]
    meta = json.loads((tag / "run_meta.json").read_text())
    (tag / "run_meta.json").write_text(json.dumps({**meta, "time": meta["time"] + 1}))  # saved again
    assert convert_to_universal(tag)[1]
    (universal_dir(tag) / "converted.json").unlink()
    assert convert_to_universal(tag)[1]
    assert json.loads((universal_dir(tag) / "converted.json").read_text())["source"] == TAG


def test_rng_on_a_new_layout_is_derived_from_seed_step_rank():
    import random

    import numpy as np

    from llp_pretrain.training.universal import reseed_for_layout

    def draw(seed, step, rank):
        reseed_for_layout(seed, step, rank)
        return torch.rand(3).tolist(), float(np.random.rand()), random.random()

    assert draw(7, 4, 1) == draw(7, 4, 1)
    assert len({str(draw(7, 4, 1)), str(draw(7, 4, 0)), str(draw(7, 5, 1)), str(draw(8, 4, 1))}) == 4


@pytest.mark.distributed
@pytest.mark.timeout(2400)
def test_the_log_says_when_rng_states_are_derived(runs):
    _, logs = runs
    assert "the layout changed (dp 2 x sp 1 -> dp 1 x sp 1): dropout RNG states are derived" in logs["b"]
    assert "the layout changed (dp 1 x sp 1 -> dp 2 x sp 2)" in logs["c"]
    assert "the layout changed (dp 2 x sp 1 -> dp 1 x sp 2)" in logs["a"]


def test_retention_removes_converted_copies_with_their_tags(tmp_path):
    from llp_pretrain.checkpoint import finalize_save

    for step in (1, 2, 3):
        tag = tmp_path / f"step{step:08d}"
        tag.mkdir()
        if step < 3:
            (tag / "run_meta.json").write_text("{}")
        (tmp_path / f"step{step:08d}.universal").mkdir()
    (tmp_path / ".step00000001.universal.partial").mkdir()
    finalize_save(tmp_path, "step00000003", {"step": 3}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step00000002", "step00000002.universal", "step00000003", "step00000003.universal"]
