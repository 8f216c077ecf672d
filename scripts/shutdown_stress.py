"""Run a tiny training N times under ``torchrun --nproc-per-node 2`` and count exit codes.

Every run must exit 0: a finished run that ends with a non-zero status (e.g. a rank aborting in a
destructor after the final checkpoint) makes a scheduler record it as failed.

    python scripts/shutdown_stress.py --runs 50 [--workdir DIR] [--out results.json]

Prints one line per run and a JSON summary ``{"runs", "exit_codes": {code: count}, "aborts",
"seconds_median"}``; exit status 0 only when every run exited 0 with no abort message.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny dataset/config writer used by the launcher tests

ABORT_MARKERS = ("terminate called", "core dumped", "ChildFailedError", "SIGABRT")


def run_once(cfg: Path, out_dir: Path, timeout: float) -> dict:
    """One 2-process training from scratch; returns ``{"rc", "abort", "seconds", "tail"}``."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cli = str(Path(sys.executable).with_name("llp-pretrain"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", cli, "train", "--config", str(cfg),
           "--overwrite", "--set", f"run.output_dir={out_dir}"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", str(e.stdout or "") + str(e.stderr or "")
    return {"rc": rc, "abort": any(m in text for m in ABORT_MARKERS), "seconds": time.time() - t0,
            "tail": text[-2000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="number of runs (default 50)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per run (default 2)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run (default 600)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the JSON summary here too")
    args = ap.parse_args(argv)
    from launch_fixtures import write_tiny_run

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llp-stress-"))
    cfg = write_tiny_run(work, max_steps=args.steps)
    codes, aborts, secs = collections.Counter(), 0, []
    for i in range(args.runs):
        r = run_once(cfg, work / "run", args.timeout)
        codes[str(r["rc"])] += 1
        aborts += r["abort"]
        secs.append(r["seconds"])
        print(f"run {i + 1}/{args.runs}: exit {r['rc']}{' ABORT' if r['abort'] else ''} ({r['seconds']:.1f} s)",
              flush=True)
        if r["rc"] != 0 or r["abort"]:
            print(r["tail"], file=sys.stderr, flush=True)
    summary = {"runs": args.runs, "exit_codes": dict(codes), "aborts": aborts,
               "seconds_median": statistics.median(secs) if secs else None}
    print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if codes.get("0", 0) == args.runs and aborts == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
