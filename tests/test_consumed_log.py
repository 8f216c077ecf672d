"""The consumed-sample audit log (``data.log_consumed``): truncation on resume, and a real 2-process
gloo run killed (SIGKILL) and resumed, against the uninterrupted run and the loader's global order."""
import collections
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llp_pretrain.training.consumed import ConsumedLog, read_log
from llp_pretrain.training.distributed import free_port
from tiny_runs import tiny_run_config, write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_resume_drops_the_lines_after_the_checkpoint(tmp_path):
    log = ConsumedLog(tmp_path, 0, 2, 0)
    for s in range(1, 6):
        log.record(s, [f"a/{s}"])
    log.close()
    (tmp_path / "consumed" / "rank00001.jsonl").write_text(json.dumps({"step": 1, "keys": ["b/1"]}) + "\n")
    (tmp_path / "consumed" / "rank00002.jsonl").write_text(
        "".join(json.dumps({"step": s, "keys": [f"c/{s}"]}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "ke')
    # a resume at step 2 by 2 processes: rank 0 cuts its own log and that of rank 2 (a larger world before);
    # the torn last line of a killed writer is dropped with the rest
    log = ConsumedLog(tmp_path, 0, 2, 2)
    log.record(3, ["a/3'"])
    log.close()
    assert _lines(tmp_path / "consumed" / "rank00000.jsonl") == [
        {"step": 1, "keys": ["a/1"]}, {"step": 2, "keys": ["a/2"]}, {"step": 3, "keys": ["a/3'"]}]
    assert [r["step"] for r in read_log(tmp_path / "consumed" / "rank00002.jsonl")] == [1, 2]
    assert not list((tmp_path / "consumed").glob("*.tmp"))
    # a damaged line that is not the last one is named, not skipped
    (tmp_path / "consumed" / "rank00001.jsonl").write_text('{"step": 1}\n' + json.dumps({"step": 2, "keys": []}) + "\n")
    with pytest.raises(ValueError, match=r"rank00001.jsonl:1: not a consumed-log line"):
        ConsumedLog(tmp_path, 1, 2, 2)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(spec, env=None, **kw):
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(REPO / "tests" / "train_many.py"), "train-many", str(spec)]
    return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)


def _descendants(pid):
    """Process ids below ``pid`` (torchrun starts its workers in sessions of their own)."""
    kids = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            kids[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in kids[todo.pop()]:
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(p):
    """SIGKILL ``p`` and every process below it; wait until they are gone."""
    procs = [p.pid, *_descendants(p.pid)]
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(60)
    deadline = time.time() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in procs[1:]):
        assert time.time() < deadline, "killed processes did not go away"
        time.sleep(0.1)


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _global_batches(data, steps, gbs, seed, buffer):
    """``{step (1-based): sorted keys}`` of the global order, read by one rank in-process."""
    from llp_pretrain.data import TrainStream, make_train_loader

    out = collections.defaultdict(list)
    for b in itertools.islice(make_train_loader(TrainStream(*data, gbs, gbs, seed=seed, shuffle_buffer=buffer)),
                              steps):
        out[b["step"] + 1] += b["keys"]
    return {k: sorted(v) for k, v in out.items()}


def _union(run_dir):
    out = collections.defaultdict(list)
    for r in (0, 1):
        for rec in read_log(Path(run_dir) / "consumed" / f"rank{r:05d}.jsonl"):
            out[rec["step"]] += rec["keys"]
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mixture", [False, True], ids=["path", "sources"])
def test_two_ranks_killed_and_resumed_log_what_the_uninterrupted_run_logs(tmp_path, mixture):
    from llp_pretrain.data import TrainSource

    ds = tmp_path / "ds"
    write_tiny_dataset(ds, seq_len=16, train_samples=[6, 5, 7, 4], val_samples=[4], vocab_size=48)
    data = {"num_workers": 1, "shuffle_buffer": 4, "log_consumed": True}
    sources = [TrainSource("", str(ds))]
    if mixture:  # a weighted mixture of two datasets (same tokenizer and seq_len)
        write_tiny_dataset(tmp_path / "code", seq_len=16, train_samples=[3, 4, 5, 3], val_samples=[5], vocab_size=48,
                           seed=7)
        sources = [TrainSource("web", str(ds), 0.6), TrainSource("code", str(tmp_path / "code"), 0.4)]
        data.update(path=None, sources=[{"path": s.path, "weight": s.weight, "name": s.name} for s in sources])
    sections = dict(data=data, train={"max_steps": 5, "micro_batch_size": 2, "save_interval": 2})

    def job(name, **extra):
        return {"config": tiny_run_config(ds, tmp_path / name, **sections), "result": str(tmp_path / f"res_{name}"),
                **extra}

    # 1) pause after step 3 (checkpoint at 2; the lines of step 3 are written) and SIGKILL every process
    (tmp_path / "killed.json").write_text(json.dumps([job("run")]))
    p = _torchrun(tmp_path / "killed.json", env={**_env(), "LLP_PRETRAIN_PAUSE_AFTER_STEP": "3"})
    try:
        seen = ""
        while "step       3/5" not in seen:
            line = p.stdout.readline()
            assert line or p.poll() is None, seen[-3000:]
            seen += line
    finally:
        _kill_tree(p)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert max(r["step"] for r in read_log(tmp_path / "run" / "consumed" / "rank00000.jsonl")) == 3
    # 2) resume to the end, and the uninterrupted run, in one job
    (tmp_path / "rest.json").write_text(json.dumps([job("run", resume="auto"), job("straight")]))
    p = _torchrun(tmp_path / "rest.json")
    out, _ = p.communicate(timeout=500)
    assert p.returncode == 0, out[-4000:]
    for r in (0, 1):
        name = f"rank{r:05d}.jsonl"
        got = read_log(tmp_path / "run" / "consumed" / name)
        assert got == read_log(tmp_path / "straight" / "consumed" / name), r
        assert [x["step"] for x in got] == [1, 2, 3, 4, 5]
    # the union over ranks of each step is that step's global batch (4 samples), none twice
    union = _union(tmp_path / "run")
    assert union == _global_batches((sources if mixture else str(ds),), 5, 4, seed=1234, buffer=4)
    res = [json.loads((tmp_path / f"res_{n}.rank0.json").read_text()) for n in ("run", "straight")]
    assert res[0]["loss"] == res[1]["loss"] and res[0]["val"] == res[1]["val"]
    if mixture:
        keys = [k for v in union.values() for k in v]
        assert {k.split("/")[0] for k in keys} == {"web", "code"}
        val = res[0]["val"]
        assert set(val["sources"]) == {"web", "code"}
        assert val["tokens"] == sum(v["tokens"] for v in val["sources"].values())
        total = sum(v["loss"] * v["tokens"] for v in val["sources"].values()) / val["tokens"]
        assert abs(val["loss"] - total) < 1e-9 and val["sources"]["web"]["bits_per_byte"] > 0
        for run in ("run", "straight"):
            for name in ("web", "code"):
                tokens = _scalars(tmp_path / run, f"train/tokens/{name}")
                assert tokens[-1] == (5, 16 * sum(k.startswith(name + "/") for k in keys)), (run, name)
            assert _scalars(tmp_path / run, "val/code/loss")[-1][0] == 5


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]
