"""Launcher pre-flight (seconds): resuming with another global batch size fails in
``python -m llp_pretrain.launch_utils layout`` (what every launcher runs first), before any process
starts, with the trainer's own message and exit status 2; another world size passes (the trainer
converts the checkpoint)."""
from __future__ import annotations

import json
import subprocess
import sys

from launch_fixtures import REPO, write_tiny_run


def _checkpoint(run, step, dp, sp=1, mb=2, ga=1):
    """A complete checkpoint tag as far as the pre-flight reads it: ``run_meta.json`` + ``latest``."""
    tag = run / "checkpoints" / f"step{step:08d}"
    tag.mkdir(parents=True)
    (tag / "run_meta.json").write_text(json.dumps({"step": step, "layout": {
        "world_size": dp * sp, "data_parallel_size": dp, "sequence_parallel_size": sp, "micro_batch_size": mb,
        "grad_accum_steps": ga}}))
    (run / "checkpoints" / "latest").write_text(tag.name + "\n")


def _layout(cfg, nproc, *train_args):
    return subprocess.run([sys.executable, "-m", "llp_pretrain.launch_utils", "layout", "--config", str(cfg),
                           "--nnodes", "1", "--nproc-per-node", str(nproc), "--", *train_args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_resume_with_other_global_batch_size_fails_in_preflight(tmp_path):
    cfg = write_tiny_run(tmp_path)  # global batch 4
    _checkpoint(tmp_path / "run", 4, dp=2, mb=4)  # global batch 8
    p = _layout(cfg, 1, "--resume", "auto")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "global_batch_size=8" in p.stderr and "--set train.global_batch_size=8" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    # the checkpoint's global batch size (on any world size), or a fresh start with --overwrite, passes
    assert _layout(cfg, 2, "--resume", "auto", "--set", "train.global_batch_size=8").returncode == 0
    assert _layout(cfg, 1, "--resume", "auto", "--set", "train.global_batch_size=8").returncode == 0
    assert _layout(cfg, 1, "--overwrite").returncode == 0
