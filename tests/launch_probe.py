"""Rendezvous probe for the launcher tests: a stand-in for ``llp-pretrain train`` that forms a real
gloo process group from the launcher's environment and all-reduces once.

Usage (what the launchers run when ``LLP_TRAIN_CMD="python tests/launch_probe.py train"``)::

    launch_probe.py train --config C.yaml [--set run.output_dir=DIR ...] [--resume auto]

Each rank writes ``DIR/probe-rank{RANK}.json`` with its environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, SLURM ids), host name, and the all-reduced sum of ``rank + 1`` over
the group (``world_size * (world_size + 1) / 2`` when the group really formed).
"""
import argparse
import datetime
import json
import os
import socket
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["train"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", nargs="+", action="append", default=[])
    ap.add_argument("--resume", default=None)
    args = ap.parse_args()
    sets = dict(kv.split("=", 1) for group in args.set for kv in group)
    out = Path(sets.get("run.output_dir", "probe_out"))
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    total = float(rank + 1)
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        assert dist.get_rank() == rank and dist.get_world_size() == world
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        total = float(t.item())
        dist.barrier()
        dist.destroy_process_group()
    record = {
        "rank": rank,
        "world_size": world,
        "allreduce_sum": total,
        "host": socket.gethostname(),
        "argv": sys.argv[1:],
        "env": {k: os.environ.get(k) for k in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID", "OMP_NUM_THREADS")},
    }
    tmp = out / f".probe-rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.rename(out / f"probe-rank{rank}.json")
    print(f"probe rank {rank}/{world}: all-reduce sum {total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
