#!/usr/bin/env python
"""Universal-checkpoint conversion time per GB of checkpoint (resume on another number of GPUs).

Trains one step of an LLP of ``--d-model`` x ``--n-layers`` on ``--world`` CPU processes (gloo,
``torchrun`` + ``tests/train_many.py``) under ZeRO-``--stage`` in fp32 and saves the checkpoint, then
converts it ``--repeats`` times with ``llp_pretrain.training.universal.convert_to_universal`` (what a
resume on another world size runs: DeepSpeed's ``ds_to_universal`` in-process, one worker, plus our
scans of every file), deleting the converted copy between repeats. Reports the checkpoint's size
on disk, each conversion's wall time, the median and seconds per GB (10^9 bytes).

Usage::

    python benchmarks/universal_conversion.py [--d-model 512 --n-layers 8] [--out FILE]

Not a test: nothing here asserts. Timings depend on the disk and on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(work: Path, d_model: int, n_layers: int, world: int, stage: int) -> Path:
    """Train one step on ``world`` processes and return the checkpoint's tag directory."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_runs import tiny_run_config, write_tiny_dataset
    from llp_pretrain.training.distributed import free_port

    write_tiny_dataset(work / "ds", seq_len=16, train_samples=[16, 16], val_samples=[4], vocab_size=128)
    ds_json = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
    cfg = tiny_run_config(work / "ds", work / "run", deepspeed=ds_json,
                          model={"d_model": d_model, "n_heads": 8, "n_layers": n_layers},
                          train={"max_steps": 1, "micro_batch_size": 1, "precision": "fp32"},
                          data={"val_samples": 1})
    spec = work / "spec.json"
    spec.write_text(json.dumps([{"config": cfg, "result": None}]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    p = subprocess.run([torchrun, "--nproc-per-node", str(world), "--master-addr", "127.0.0.1", "--master-port",
                        str(free_port()), str(REPO / "tests" / "train_many.py"), "train-many", str(spec)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise RuntimeError(f"training failed (exit {p.returncode})\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    return work / "run" / "checkpoints" / "step00000001"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--world", type=int, default=2, help="processes the checkpoint is written with (default 2)")
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from llp_pretrain.training.universal import convert_to_universal, universal_dir

    work = Path(tempfile.mkdtemp(prefix="llp-universal-"))
    try:
        tag = make_checkpoint(work, args.d_model, args.n_layers, args.world, args.stage)
        size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        secs = []
        for r in range(args.repeats):
            shutil.rmtree(universal_dir(tag), ignore_errors=True)
            t0 = time.perf_counter()
            _, converted = convert_to_universal(tag)
            secs.append(time.perf_counter() - t0)
            assert converted
            print(f"conversion {r + 1}: {secs[-1]:.2f} s", file=sys.stderr, flush=True)
        out_size = sum(f.stat().st_size for f in universal_dir(tag).rglob("*") if f.is_file())
        med = statistics.median(secs)
        res = {"d_model": args.d_model, "n_layers": args.n_layers, "zero_stage": args.stage, "world": args.world,
               "checkpoint_bytes": size, "converted_bytes": out_size, "seconds": [round(s, 3) for s in secs],
               "median_seconds": round(med, 3), "seconds_per_gb": round(med / (size / 1e9), 3),
               "cpus": os.cpu_count()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
