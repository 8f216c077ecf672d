"""Step time of the training engine from two source trees, interleaved in one run (CPU or GPU).

Used to show that a restructure of the engine costs nothing: each round trains the same tiny LLP
for ``--steps`` optimizer steps once with every tree (order alternating between rounds), reads
``train/step_time`` from the run's TensorBoard events (the first ``--warmup`` steps dropped) and
reports per-tree medians and their ratio as JSON.

    python benchmarks/engine_step_time.py --tree old=/path/to/old/checkout --tree new=. \\
        --rounds 5 --steps 30 --out benchmarks/results/engine_step_time.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNNER = r"""
import sys
from llp_pretrain.config import load_config
from llp_pretrain.engine import train
import json
cfg = load_config(raw=json.loads(sys.argv[1]))
train(cfg, overwrite=True)
"""


def tiny_config(data: Path, out: Path, steps: int) -> dict:
    return {"model": {"variant": "llp", "vocab_size": "auto", "d_model": 64, "n_heads": 4, "n_layers": 2,
                      "seq_len": 64, "segment_len": 16},
            "data": {"path": str(data), "num_workers": 0, "shuffle_buffer": 8, "val_samples": 4},
            "train": {"max_steps": steps, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 1e-3, "min_lr": 1e-4,
                      "warmup_steps": 2, "log_interval": 1, "save_interval": 0, "eval_interval": 0,
                      "sample_tokens": 0, "peak_flops": 1e11, "precision": "fp32"},
            "parallel": {"sequence_parallel_size": 1},
            "deepspeed": str(REPO / "configs" / "deepspeed" / "zero0.json"),
            "run": {"output_dir": str(out)}}


def step_times(run_dir: Path, warmup: int):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars("train/step_time") if e.step > warmup]


def run_tree(root: Path, cfg: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = str(root)  # this tree's packages before the installed ones
    env.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cfg)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"{root}: exit {p.returncode}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=DIR", help="a source tree (repeat)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="first steps not counted (default 3)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_runs import write_tiny_dataset

    work = Path(tempfile.mkdtemp(prefix="llp-steptime-"))
    write_tiny_dataset(work / "data", seq_len=64, train_samples=[256, 256], val_samples=[8], vocab_size=128)
    times = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            out = work / f"run_{name}"
            run_tree(Path(trees[name]).resolve(), tiny_config(work / "data", out, args.steps))
            st = step_times(out, args.warmup)
            times[name] += st
            print(f"round {r + 1} {name}: median step {1e3 * statistics.median(st):.2f} ms", flush=True)
    res = {"steps_per_run": args.steps, "rounds": args.rounds, "warmup_dropped": args.warmup,
           "median_step_ms": {n: 1e3 * statistics.median(v) for n, v in times.items()},
           "samples": {n: len(v) for n, v in times.items()}}
    names = list(trees)
    if len(names) == 2:
        res[f"ratio_{names[1]}_over_{names[0]}"] = res["median_step_ms"][names[1]] / res["median_step_ms"][names[0]]
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
