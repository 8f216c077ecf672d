"""Sequence-parallel LLP on CPU: per-rank peak memory and tokens/s vs. P, and the longest
sequence that fits a fixed per-rank memory budget as P doubles.

Usage::

    python benchmarks/sequence_parallel.py [--out benchmarks/results/sequence_parallel.json]
        [--sizes 1,2,4] [--seq-len 8192] [--budget-mib 96] [--steps 5] [--threads 1]

For each ``P`` the script starts ``P`` gloo processes (``torch.multiprocessing`` spawn) and runs
training steps (forward + backward of ``sequence_parallel_lm_loss``) of one LLP model:

1. fixed global ``seq_len``: per-rank peak memory of one step and the median step time over
   ``--steps`` steps (the slowest rank's), tokens/s = ``B * seq_len / median step time``;
2. memory budget: the largest global sequence (a multiple of ``P * segment_len``) whose step
   stays within ``--budget-mib`` per rank (doubling, then bisection in whole segments).

Peak memory is measured, not modelled: before a step the process trims the allocator, resets
the kernel's resident-set high-water mark (``/proc/self/clear_refs`` = 5, Linux) and reads
``VmRSS``; after the step ``VmHWM - VmRSS_before`` is the step's peak (activations, halo
buffers, gradients, temporaries). All ratios come from one run. Output: JSON on stdout and in
``--out``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from llp_pretrain.training.distributed import free_port

MODEL = dict(variant="llp", vocab_size=256, d_model=128, n_heads=4, n_layers=2, segment_len=64)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> int:
    """Trim the heap, reset VmHWM, return the current VmRSS (KiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _step(model, groups, tokens):
    """One forward+backward; returns (seconds, peak MiB above the pre-step resident set)."""
    from llp_pretrain.parallel import sequence_parallel_lm_loss

    model.zero_grad(set_to_none=True)
    base = _reset_peak()
    t0 = time.perf_counter()
    loss_sum, n = sequence_parallel_lm_loss(model, tokens, groups)
    (loss_sum / n).backward()
    dt = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - base) / 1024.0
    return dt, peak


def _worker(rank, world, port, spec, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(spec["threads"])
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from llp_pretrain.models import build_model
        from llp_pretrain.parallel import initialize_sequence_parallel

        groups = initialize_sequence_parallel(world)
        L, B = MODEL["segment_len"], spec["batch"]
        torch.manual_seed(0)
        model = build_model(dict(MODEL, seq_len=spec["seq_len"]))
        model.train()

        def tokens_for(n_global):
            g = torch.Generator().manual_seed(n_global)
            return torch.randint(0, MODEL["vocab_size"], (B, n_global + 1), generator=g)

        def agreed(x, op):
            t = torch.tensor([float(x)])
            dist.all_reduce(t, op=op)
            return t.item()

        # 1. fixed global sequence length
        toks = tokens_for(spec["seq_len"])
        _step(model, groups, toks)  # warm-up
        times, peaks = [], []
        for _ in range(spec["steps"]):
            dist.barrier()
            dt, peak = _step(model, groups, toks)
            times.append(agreed(dt, dist.ReduceOp.MAX))
            peaks.append(peak)
        fixed = dict(step_s_median=statistics.median(times), step_s_all=times,
                     peak_mib_rank=max(peaks),
                     peak_mib_max_rank=agreed(max(peaks), dist.ReduceOp.MAX))

        # 2. longest sequence within the per-rank budget (local chunk in whole segments)
        budget = spec["budget_mib"]

        def fits(n_local_segments):
            n_global = n_local_segments * L * world
            _, peak = _step(model, groups, tokens_for(n_global))
            return agreed(peak, dist.ReduceOp.MAX) <= budget, agreed(peak, dist.ReduceOp.MAX)

        probes = []
        lo, hi = 0, None
        s = 1
        while hi is None:
            ok, pk = fits(s)
            probes.append((s * L * world, pk))
            if ok:
                lo, s = s, s * 2
            else:
                hi = s
            if s * L * world > spec["max_seq_len"]:
                break
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ok, pk = fits(mid)
                probes.append((mid * L * world, pk))
                lo, hi = (mid, hi) if ok else (lo, mid)
        longest = lo * L * world
        result = dict(rank=rank, fixed=fixed, longest_seq_len=longest, probes=probes,
                      capped=hi is None)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_size(world, spec, tmp: Path):
    out = tmp / f"p{world}"
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, free_port(), spec, str(out)), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/sequence_parallel.json")
    ap.add_argument("--sizes", default="1,2,4", help="sequence-parallel sizes P to run")
    ap.add_argument("--seq-len", type=int, default=8192, help="fixed global sequence (tokens)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--budget-mib", type=float, default=96.0, help="per-rank peak memory budget")
    ap.add_argument("--max-seq-len", type=int, default=1 << 18)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    L = MODEL["segment_len"]
    for p in sizes:
        if args.seq_len % (p * L):
            ap.error(f"--seq-len {args.seq_len} must be divisible by P * segment_len = {p * L}")
    spec = dict(seq_len=args.seq_len, batch=args.batch, steps=args.steps,
                budget_mib=args.budget_mib, max_seq_len=args.max_seq_len, threads=args.threads)
    tmp = Path(args.out).with_suffix(".parts")
    rows = {}
    for p in sizes:
        res = run_size(p, spec, tmp)
        r0 = res[0]
        rows[p] = dict(
            sequence_parallel_size=p,
            fixed_seq_len=dict(
                seq_len=args.seq_len,
                tokens_per_s=args.batch * args.seq_len / r0["fixed"]["step_s_median"],
                step_s_median=r0["fixed"]["step_s_median"],
                peak_mib_per_rank=[r["fixed"]["peak_mib_rank"] for r in res],
            ),
            budget=dict(budget_mib=args.budget_mib, longest_seq_len=r0["longest_seq_len"],
                        capped_at_max=r0["capped"], probes=r0["probes"]),
        )
        print(f"P={p}: {json.dumps(rows[p]['fixed_seq_len'])} longest={r0['longest_seq_len']}",
              file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)  # per-rank result files
    ratios = {}
    for a, b in zip(sizes, sizes[1:]):
        la, lb = rows[a]["budget"]["longest_seq_len"], rows[b]["budget"]["longest_seq_len"]
        ma = max(rows[a]["fixed_seq_len"]["peak_mib_per_rank"])
        mb = max(rows[b]["fixed_seq_len"]["peak_mib_per_rank"])
        ratios[f"P{a}->P{b}"] = dict(
            longest_seq_len_ratio=lb / la if la else None,
            peak_memory_ratio=mb / ma if ma else None,
            tokens_per_s_ratio=rows[b]["fixed_seq_len"]["tokens_per_s"]
            / rows[a]["fixed_seq_len"]["tokens_per_s"],
        )
    report = dict(
        benchmark="sequence_parallel",
        model=MODEL,
        batch=args.batch,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     threads_per_rank=args.threads),
        results=[rows[p] for p in sizes],
        ratios=ratios,
        target="longest_seq_len_ratio >= 1.8 per doubling of P",
        target_met=all(r["longest_seq_len_ratio"] is not None and r["longest_seq_len_ratio"] >= 1.8
                       for r in ratios.values()),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    os.replace(tmp_out, out)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
