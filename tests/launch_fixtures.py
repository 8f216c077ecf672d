"""Fixtures for the launcher tests: a tiny dataset and run config that train in seconds on CPU.

The dataset is written by ``tiny_runs.write_tiny_dataset`` (tests/tiny_runs.py) (real WebDataset shards and
manifest, synthetic tokens); the config is a 2-layer LLP with ``d_model`` 32 that trains with
ZeRO-0 on gloo. Helpers read back what a run left: checkpoint tags, TensorBoard scalars, weights.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
#: the virtualenv running the tests (the launchers activate it), or None outside a venv
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else None


def launch_env(**extra: str) -> Dict[str, str]:
    """Environment for launcher subprocesses: the test interpreter's venv (or the interpreter itself
    outside a venv), no inherited distributed/SLURM/LLP variables, one OpenMP thread. With
    ``LLP_PRETRAIN_PAUSE_AFTER_STEP`` the launchers run ``tests/train_many.py train`` (which installs the
    pause callback) instead of ``llp-pretrain train``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not k.startswith("SLURM_") and not k.startswith("LLP_")}
    if VENV is not None and (VENV / "bin" / "activate").is_file():
        env["LLP_VENV"] = str(VENV)
    else:
        env["LLP_PYTHON"] = sys.executable
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    if "LLP_PRETRAIN_PAUSE_AFTER_STEP" in extra and "LLP_TRAIN_CMD" not in extra:
        # the test-only pause callback is installed by the test harness's entry point, not the CLI
        env["LLP_TRAIN_CMD"] = f"python {REPO / 'tests' / 'train_many.py'} train"
    return env


def write_tiny_run(root: Path, *, max_steps: int = 6, save_interval: int = 0, num_shards: int = 4,
                   samples_per_shard: int = 24, extra: Optional[Dict] = None) -> Path:
    """Write ``root/data`` (shards) and ``root/config.yaml``; return the config path.

    Global batch 4 (micro-batch 2 on 2 data-parallel ranks, or 2 x 2 accumulation on one), seq_len
    32, LLP with 4 segments of 8 tokens, fp32, lr warmup 0 so every step moves the weights.
    """
    from tiny_runs import write_tiny_dataset

    data = root / "data"
    if not (data / "manifest.json").is_file():
        write_tiny_dataset(data, seq_len=32, train_samples=[samples_per_shard] * num_shards,
                           val_samples=[8], vocab_size=64, seed=0)
    cfg = {
        "model": {"variant": "llp", "vocab_size": 64, "d_model": 32, "n_heads": 2, "n_layers": 2,
                  "seq_len": 32, "segment_len": 8},
        "data": {"path": str(data), "num_workers": 0, "shuffle_buffer": 8, "val_samples": 4},
        "train": {"max_steps": max_steps, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3,
                  "min_lr": 3e-4, "warmup_steps": 0, "precision": "fp32", "seed": 7, "log_interval": 1,
                  "eval_interval": 0, "save_interval": save_interval, "keep_checkpoints": 3,
                  "sample_tokens": 0},
        "parallel": {"sequence_parallel_size": 1},
        "deepspeed": str(REPO / "configs" / "deepspeed" / "zero0.json"),
        "run": {"output_dir": str(root / "run")},
    }
    for dotted, value in (extra or {}).items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def checkpoint_steps(run_dir: Path) -> List[int]:
    """Optimizer steps of the complete checkpoints in ``run_dir/checkpoints`` (sorted)."""
    from llp_pretrain import checkpoint as ck

    return sorted(ck.step_of(t) for t in ck.complete_tags(run_dir / "checkpoints"))


def latest_meta(run_dir: Path) -> Dict:
    """``run_meta.json`` of the checkpoint named by ``latest``."""
    from llp_pretrain import checkpoint as ck

    tag = ck.read_latest(run_dir / "checkpoints")
    assert tag is not None, f"no latest checkpoint in {run_dir}"
    return ck.read_meta(run_dir / "checkpoints" / tag)


def final_weights(run_dir: Path):
    """The model weights (name -> tensor) of the latest checkpoint."""
    from llp_pretrain.export import load_checkpoint_weights

    state, _, _ = load_checkpoint_weights(run_dir)
    return state


def tensorboard_steps(run_dir: Path, tag: str = "train/loss") -> List[int]:
    """Steps of every ``tag`` scalar in the run's TensorBoard event files, in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: List[int] = []
    tb = run_dir / "tensorboard"
    files = sorted(tb.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime) if tb.is_dir() else []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            steps += [e.step for e in acc.Scalars(tag)]
    return steps


def event_files(run_dir: Path) -> List[Path]:
    return sorted(run_dir.rglob("events.out.tfevents.*"))
