"""DeepSpeed engine end to end on CPU with real processes (gloo), tiny LLP models.

Process launches are shared through module-scoped fixtures (several trainings run one after the
other inside one process / one torchrun job) to keep the suite fast:

* ``single``: one plain process: the reference run (1 rank, 2 loader workers, accumulation 2),
  micro-batch 8 x accumulation 1 and 4 x 2 (one step each), and the uninterrupted 8-step run that
  the kill-and-resume test compares against.
* ``two_ranks``: one ``torchrun --nproc-per-node 2`` job: ZeRO stages 0-3 (and ZeRO-2 with activation
  checkpointing) on the same global batch as the reference, and a run over 3 uneven shards.
* ``kill_resume``: three ``llp-pretrain train`` processes: SIGKILL mid-run, resume, SIGTERM, resume.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tiny_runs import tiny_run_config, write_tiny_dataset
from llp_pretrain.training.distributed import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
CLI = str(Path(sys.executable).with_name("llp-pretrain"))

pytestmark = [pytest.mark.distributed]

# tied input/output embeddings in the ZeRO comparison runs: export must rebuild shared tensors too
TIED = {"tie_embeddings": True}


def _env():
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env



def _run(cmd, timeout, **kw):
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-6000:]}")
    return p


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def _weights(run_dir):
    from llp_pretrain.export import load_checkpoint_weights

    state, _, _ = load_checkpoint_weights(run_dir)
    return state


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("engine")
    # two equal shards: with shuffle_buffer 1 the global batches of 1 rank x 2 workers x accumulation 2
    # and of 2 ranks x 1 worker are the same samples, so the loss curves must agree
    write_tiny_dataset(w / "ds", seq_len=16, train_samples=[12, 12], val_samples=[4], vocab_size=48)
    write_tiny_dataset(w / "uneven", seq_len=16, train_samples=[7, 3, 5], val_samples=[3], vocab_size=48)
    return w


def _job(work, name, result=True, **sections):
    cfg = tiny_run_config(work / sections.pop("ds", "ds"), work / name, **sections)
    return {"config": cfg, "result": str(work / f"res_{name}") if result else None}


@pytest.fixture(scope="module")
def single(work):
    jobs = [
        _job(work, "ref", data={"num_workers": 2, "shuffle_buffer": 1}, model=TIED,
             train={"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2}),
        # eps = 1 makes Adam's first update smooth in the gradient (not ~lr * sign(g)), so rounding-level
        # gradient differences stay rounding-level weight differences
        _job(work, "mb8x1", train={"max_steps": 1, "micro_batch_size": 8, "grad_accum_steps": 1, "warmup_steps": 0,
                                   "eps": 1.0, "lr": 1.0}, data={"shuffle_buffer": 1}),
        _job(work, "mb4x2", train={"max_steps": 1, "micro_batch_size": 4, "grad_accum_steps": 2, "warmup_steps": 0,
                                   "eps": 1.0, "lr": 1.0}, data={"shuffle_buffer": 1}),
        _job(work, "straight", **_resume_sections()),
        _job(work, "bf16", data={"num_workers": 2, "shuffle_buffer": 1},
             train={"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "precision": "bf16"}),
        _job(work, "timelimit", train={"max_steps": 50, "time_limit_minutes": 1e-6}),
        # lr 1e30: the first update makes every later loss non-finite -> skipped, then abort after 3
        {**_job(work, "nan", train={"max_steps": 10, "lr": 1e30, "min_lr": 0.0, "warmup_steps": 0,
                                    "max_nonfinite_steps": 3}), "expect_error": True},
    ]
    spec = work / "single.json"
    spec.write_text(json.dumps(jobs))
    _run([PY, str(REPO / "tests" / "train_many.py"), "train-many", str(spec)], timeout=400)
    return work


@pytest.fixture(scope="module")
def two_ranks(work, single):
    # the documented way to continue a 1-rank run on 2 ranks: export, then init_from
    from llp_pretrain.export import export_checkpoint

    export_checkpoint(single / "ref", work / "ref_export")
    jobs = [_job(work, f"z{st}", data={"num_workers": 1, "shuffle_buffer": 1}, model=TIED,
                 train={"max_steps": 4, "micro_batch_size": 2, "sample_tokens": 3},
                 deepspeed=f"configs/deepspeed/zero{st}.json")
            for st in (0, 1, 2, 3)]
    jobs.append(_job(work, "z2ckpt", data={"num_workers": 1, "shuffle_buffer": 1},
                     train={"max_steps": 4, "micro_batch_size": 2},
                     model={**TIED, "checkpoint_activations": True},
                     deepspeed="configs/deepspeed/zero2.json"))
    jobs.append(_job(work, "uneven", ds="uneven", data={"num_workers": 1, "shuffle_buffer": 2},
                     train={"max_steps": 7, "micro_batch_size": 2, "log_interval": 7}))
    # ZeRO-3 resume on 2 ranks (partitioned optimizer state, per-rank RNG and data position):
    # 2 steps, then resume to 4, against 4 straight steps; constant LR so max_steps does not matter
    const = {"micro_batch_size": 2, "warmup_steps": 0, "min_lr": 3e-3, "lr": 3e-3}
    z3 = dict(data={"num_workers": 1, "shuffle_buffer": 4}, deepspeed="configs/deepspeed/zero3.json")
    jobs.append(_job(work, "z3_straight", train={**const, "max_steps": 4}, **z3))
    jobs.append(_job(work, "z3_resumed", train={**const, "max_steps": 2}, **z3))
    jobs.append({**_job(work, "z3_resumed", train={**const, "max_steps": 4}, **z3), "resume": "auto"})
    jobs.append(_job(work, "from_ref", model=TIED, train={"max_steps": 1, "micro_batch_size": 2, "lr": 1e-12,
                                                        "min_lr": 0.0, "init_from": str(work / "ref_export")}))
    spec = work / "two.json"
    spec.write_text(json.dumps(jobs))
    _run([TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
          str(REPO / "tests" / "train_many.py"), "train-many", str(spec)], timeout=600)
    return work


@pytest.mark.timeout(700)
def test_zero_stages_on_two_ranks_follow_single_process_curve(single, two_ranks):
    ref = _scalars(single / "ref", "train/loss")
    assert [s for s, _ in ref] == [1, 2, 3, 4]
    assert ref[-1][1] < ref[0][1]  # it learns
    for name in ("z0", "z1", "z2", "z3", "z2ckpt"):
        got = _scalars(two_ranks / name, "train/loss")
        assert [s for s, _ in got] == [1, 2, 3, 4], name
        for (_, a), (_, b) in zip(ref, got):
            assert abs(a - b) < 1e-4, (name, ref, got)
        lr_ref, lr_got = _scalars(single / "ref", "train/lr"), _scalars(two_ranks / name, "train/lr")
        assert lr_ref == lr_got
    # activation checkpointing leaves the gradients unchanged (same ZeRO-2 run without it)
    gn, gn_ckpt = _scalars(two_ranks / "z2", "train/grad_norm"), _scalars(two_ranks / "z2ckpt", "train/grad_norm")
    assert [s for s, _ in gn_ckpt] == [1, 2, 3, 4]
    assert all(abs(a - b) <= 1e-5 * max(1.0, a) for (_, a), (_, b) in zip(gn, gn_ckpt)), (gn, gn_ckpt)
    w2, w2c = _weights(two_ranks / "z2"), _weights(two_ranks / "z2ckpt")
    assert all(torch.allclose(w2[k], w2c[k], atol=1e-6) for k in w2)
    # the generated text sample works under every stage (ZeRO-3 gathers the partitioned weights)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("z0", "z1", "z2", "z3"):
        ea = EventAccumulator(str(two_ranks / name / "tensorboard"))
        ea.Reload()
        assert "samples/generated/text_summary" in ea.Tags()["tensors"], (name, ea.Tags())
    # weights after 4 steps: ZeRO-3 (consolidated by export from partitions) matches ZeRO-0 on 2 ranks
    w0, w3 = _weights(two_ranks / "z0"), _weights(two_ranks / "z3")
    assert w0.keys() == w3.keys()
    for k in w0:
        assert w0[k].shape == w3[k].shape
        assert torch.allclose(w0[k], w3[k], atol=2e-5, rtol=1e-4), k


@pytest.mark.timeout(700)
def test_zero3_two_rank_resume_is_exact(two_ranks):
    a, b = _weights(two_ranks / "z3_straight"), _weights(two_ranks / "z3_resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _scalars(two_ranks / "z3_resumed", "train/loss") == _scalars(two_ranks / "z3_straight", "train/loss")
    res = [json.loads((two_ranks / f"res_z3_resumed.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in res] == [4, 4]


@pytest.mark.timeout(700)
def test_uneven_shards_equal_step_counts(two_ranks):
    results = [json.loads((two_ranks / f"res_uneven.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in results] == [7, 7]
    assert all(r["stopped_by"] == "max_steps" for r in results)


@pytest.mark.timeout(500)
def test_micro_batch_8x1_equals_4x2(single):
    from llp_pretrain.config import load_config
    from llp_pretrain.models import build_model

    a, b = _weights(single / "mb8x1"), _weights(single / "mb4x2")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7, rtol=1e-6), k
    # and a real step happened: weights moved away from the seeded initialisation
    cfg = load_config(raw=tiny_run_config(single / "ds", single / "x"))
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4


@pytest.mark.timeout(500)
def test_bf16_on_cpu_follows_fp32_curve(single):
    ref, got = _scalars(single / "ref", "train/loss"), _scalars(single / "bf16", "train/loss")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert all(abs(a - b) < 0.03 for (_, a), (_, b) in zip(ref, got)), (ref, got)
    assert ref != got  # it really ran in bf16
    w = _weights(single / "bf16")  # consolidated fp32 export of a bf16 run
    assert all(v.dtype == torch.float32 for v in w.values())


@pytest.mark.timeout(500)
def test_time_limit_saves_and_stops(single):
    res = json.loads((single / "res_timelimit.rank0.json").read_text())
    assert (res["step"], res["stopped_by"]) == (1, "time_limit")
    assert res["val"] is not None  # final evaluation still runs
    assert (single / "timelimit" / "checkpoints" / "latest").read_text().strip() == "step00000001"


@pytest.mark.timeout(500)
def test_nonfinite_steps_are_skipped_then_abort(single):
    res = json.loads((single / "res_nan.rank0.json").read_text())
    assert res["type"] == "FloatingPointError", res
    assert "3 non-finite training steps in a row (last at step 4)" in res["error"]
    skipped = _scalars(single / "nan", "train/skipped_steps")
    assert [v for _, v in skipped] == [0, 1, 2]  # steps 1..3 logged; step 4 aborted before logging


def _resume_sections():
    # dropout > 0: the resumed run must also continue the dropout RNG streams exactly
    return dict(data={"num_workers": 1, "shuffle_buffer": 4}, model={"dropout": 0.1},
                train={"max_steps": 8, "micro_batch_size": 2, "grad_accum_steps": 2, "save_interval": 4,
                       "warmup_steps": 3, "sample_tokens": 4, "eval_interval": 3})


def _wait_for_line(proc, needle, timeout):
    """Read the process's stdout until a line contains ``needle``; returns the lines read."""
    end = time.time() + timeout
    lines = []
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"'{needle}' not seen within {timeout}s; output:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def kill_resume(work):
    run = work / "resumed"
    cfg = tiny_run_config(work / "ds", run, **_resume_sections())
    path = work / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the CLI through the test harness, which installs the pause callback (tests/train_many.py)
    cmd = [PY, str(REPO / "tests" / "train_many.py"), "train", "--config", str(path), "--resume", "auto"]
    # 1) pause after step 6 (checkpoint at 4 exists, events up to 6 written) and SIGKILL
    env = {**_env(), "LLP_PRETRAIN_PAUSE_AFTER_STEP": "6"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(p, "step       6/8", 240)
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        p.kill()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000004"
    # 2) resume, pause after step 6 again, SIGTERM: saves step 6 and exits 0
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _wait_for_line(p, "step       6/8", 240)
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    sigterm = {"rc": p.returncode, "out": "".join(out) + rest}
    latest_after_term = (run / "checkpoints" / "latest").read_text().strip()
    # 3) resume to the end
    _run(cmd, timeout=300)
    return run, sigterm, latest_after_term


@pytest.mark.timeout(900)
def test_kill_and_resume_is_bit_exact(single, kill_resume):
    run, sigterm, latest = kill_resume
    assert "resumed from" in sigterm["out"] and "step00000004" in sigterm["out"]
    a, b = _weights(single / "straight"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the LR of every step equals the uninterrupted run's, and the loss curves are identical
    assert _scalars(run, "train/lr") == _scalars(single / "straight", "train/lr")
    assert _scalars(run, "train/loss") == _scalars(single / "straight", "train/loss")


@pytest.mark.timeout(900)
def test_sigterm_saves_a_usable_checkpoint(kill_resume):
    run, sigterm, latest = kill_resume
    assert sigterm["rc"] == 0, sigterm["out"]
    assert latest == "step00000006"
    assert "stopped by signal at step 6" in sigterm["out"]
    meta = json.loads((run / "checkpoints" / "step00000006" / "run_meta.json").read_text())
    assert meta["step"] == 6 and meta["consumed_batches_per_rank"] == 12


@pytest.mark.timeout(900)
def test_tensorboard_events_unique_increasing_steps(kill_resume):
    run, _, _ = kill_resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    want = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "train/step_time",
            "train/data_wait_fraction", "train/memory_gb", "val/loss", "val/ppl", "val/bits_per_byte"}
    assert want <= tags, want - tags
    for tag in want:
        steps = [e.step for e in ea.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in ea.Scalars("val/loss")] == [3, 6, 8]
    assert len(ea.Tags()["tensors"]) >= 1  # generated text samples (and hparams)
    # only rank 0 writes: one events file per process start that reached the writer (3 starts)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3


@pytest.mark.timeout(900)
def test_export_round_trip_and_eval(kill_resume, two_ranks, tmp_path):
    from safetensors.torch import load_file

    from llp_pretrain.cli import evaluate_checkpoint, main as cli_main
    from llp_pretrain.export import load_model

    run, _, _ = kill_resume
    for src in (run, two_ranks / "z3"):
        out = tmp_path / src.name
        assert cli_main(["export", str(src), str(out)]) == 0
        exported = load_file(str(out / "model.safetensors"))
        state = _weights(src)
        assert exported.keys() == state.keys()
        for k in state:
            assert torch.equal(exported[k], state[k].float()), k
        model, cfg, _ = load_model(out)
        assert cfg["d_model"] == 32
        if cfg["tie_embeddings"]:
            assert torch.equal(exported["tok_emb.weight"], exported["lm_head.weight"])
        for k, v in model.state_dict().items():
            assert torch.equal(v, exported[k])
    # eval on the exported model equals eval on the checkpoint
    r1 = evaluate_checkpoint(str(run), str(run.parent / "ds"), stride=8)
    r2 = evaluate_checkpoint(str(tmp_path / run.name), str(run.parent / "ds"), stride=8)
    assert r1 == r2 and r1.tokens == 4 * 16  # 4 val samples of 16 tokens: every target scored once


@pytest.mark.timeout(700)
def test_continue_on_other_data_parallel_size_via_export(two_ranks):
    from safetensors.torch import load_file

    ref = load_file(str(two_ranks / "ref_export" / "model.safetensors"))
    got = _weights(two_ranks / "from_ref")
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k


def test_resume_with_other_global_batch_size_fails_up_front(work):
    from llp_pretrain.config import load_config
    from llp_pretrain.engine import DistInfo, check_resume_layout
    from llp_pretrain.layout import ParallelLayout

    cfg = load_config(raw=tiny_run_config(work / "ds", work / "x"), world_size=2)  # 2 x 1 x dp 2 = 4
    meta = {"layout": {"world_size": 1, "data_parallel_size": 1, "sequence_parallel_size": 1,
                       "micro_batch_size": 2, "grad_accum_steps": 1, "num_workers": cfg.data.num_workers,
                       "seed": cfg.train.seed, "shuffle_buffer": cfg.data.shuffle_buffer, "global_batch_size": 2,
                       "virtual_readers": cfg.data.virtual_readers}}
    d = DistInfo(rank=0, local_rank=0, layout=ParallelLayout(world_size=2, sp_size=1), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="global_batch_size=2 .*this run has 4.*train.global_batch_size=2"):
        check_resume_layout(meta, cfg, d, "CKPT")
    meta["layout"].update(grad_accum_steps=2, global_batch_size=4)  # the same global batch on another layout is allowed
    check_resume_layout(meta, cfg, d, "CKPT")


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.timeout(400)
def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(work):
    """Only one of two ranks gets SIGTERM: the ranks agree (all-reduce every step), both save the
    same step and exit 0."""
    spec = work / "term.json"
    spec.write_text(json.dumps([_job(work, "term2", train={"max_steps": 50, "micro_batch_size": 2},
                                     data={"num_workers": 1})]))
    env = {**_env(), "LLP_PRETRAIN_PAUSE_AFTER_STEP": "3"}
    p = subprocess.Popen([TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                          str(_free_port()), str(REPO / "tests" / "train_many.py"), "train-many", str(spec)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(p, "step       3/50", 240)
        workers = [c for c in _children(p.pid) if "train_many.py" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGTERM)
        out, _ = p.communicate(timeout=200)
    finally:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    res = [json.loads((work / f"res_term2.rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["step"], r["stopped_by"]) for r in res] == [(3, "signal"), (3, "signal")]
    assert (work / "term2" / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert json.loads((work / "term2" / "checkpoints" / "step00000003" / "run_meta.json").read_text())["step"] == 3
