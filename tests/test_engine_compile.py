"""``train.compile: true`` (torch.compile through DeepSpeed's ``engine.compile()``) follows the eager
loss curve on CPU: 5 steps of a tiny LLP, per-step training loss within 1e-4 nats (fp32; inductor
may reorder floating-point sums, so not bit-identical). Inductor compiles C++ on the CPU: minutes on a
busy machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import tiny_run_config, write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _losses(run: Path):
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars("train/loss")]


@pytest.mark.timeout(1500)
def test_compiled_matches_eager_for_five_steps(tmp_path):
    write_tiny_dataset(tmp_path / "ds", seq_len=16, train_samples=[40], vocab_size=64)
    jobs = [{"config": tiny_run_config(tmp_path / "ds", tmp_path / name, train={"max_steps": 5, "compile": comp,
                                                                                  "precision": "fp32"}),
             "result": str(tmp_path / f"res_{name}")} for name, comp in (("eager", False), ("compiled", True))]
    (tmp_path / "spec.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.run([sys.executable, str(REPO / "tests" / "train_many.py"), "train-many", str(tmp_path / "spec.json")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1450)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 5
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= TOL, (eager, compiled)
    assert eager[0] != eager[-1]  # the weights moved: the comparison covers the updates too
