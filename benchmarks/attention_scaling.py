#!/usr/bin/env python
"""Attention scaling benchmark: forward+backward time and peak memory per variant and length.

All variants at d_model 256, 4 heads, 2 layers, segment_len 256 (LLP; also the latent length of
the PerceiverAR family and the history segment size of segmented_history), N = 1k..16k, batch 1,
fp32, measured side by side in one run; ratios against ``gpt``. Also LLP's decode latency per
token after a 1k and a 16k prompt (and gpt's, for comparison, where asked).

Each (variant, N) runs in a fresh child process so that peak memory can be read:
- CPU: peak RSS (``ru_maxrss``) minus the RSS just before the first step (MiB);
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step (MiB).
Times are medians over ``--repeats`` steps after one warm-up step.

Usage::

    python benchmarks/attention_scaling.py                       # everything, JSON to
                                                                 # benchmarks/results/
    python benchmarks/attention_scaling.py --lengths 1024 2048 --variants gpt llp

Output: a JSON document (``--out``) with every measurement, the ratios and the targets of
issue 3 (LLP 16k step <= 0.2x gpt; LLP time(16k)/time(2k) <= 9; LLP decode(16k)/decode(1k)
<= 1.2), plus a table on stdout. Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["gpt", "llp", "perceiver_ar", "history_self_attention", "compressed_history",
            "segmented_history"]


def model_fields(variant: str, N: int, args) -> dict:
    f = dict(variant=variant, vocab_size=args.vocab_size, d_model=args.d_model,
             n_heads=args.n_heads, n_layers=args.n_layers, seq_len=N)
    L = args.segment_len
    if variant == "llp":
        f["segment_len"] = L
    if variant in ("perceiver_ar", "history_self_attention", "compressed_history",
                   "segmented_history"):
        f["latent_len"] = L
    if variant == "segmented_history":
        f["history_segments"] = (N - L) // L
    return f


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(spec: dict) -> dict:
    """Run one measurement in this process and return its JSON result."""
    import torch

    from llp_pretrain.models import ModelConfig, build_model, lm_loss
    from llp_pretrain.models.generation import decode_step, prefill

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = ModelConfig(**spec["model"])
    model = build_model(cfg).to(dev)
    N = cfg.seq_len
    out = {"variant": cfg.variant, "N": N, "params": model.num_params(),
           "flops_per_token": model.flops_per_token()}
    if spec["kind"] == "step":
        model.train()
        tokens = torch.randint(0, cfg.vocab_size, (spec["batch"], N + 1), device=dev)

        def step():
            loss, n = lm_loss(model, tokens)
            (loss / n).backward()
            model.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        if dev.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_mib()
        times = []
        for i in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            step()
            if i > 0:
                times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        out.update(step_s=statistics.median(times), step_times_s=times, peak_mem_mib=peak,
                   tokens_per_s=spec["batch"] * N / statistics.median(times))
    else:  # decode
        model.eval()
        P = spec["prompt_len"]
        ids = torch.randint(0, cfg.vocab_size, (1, P + spec["decode_steps"] + 1), device=dev)
        with torch.no_grad():
            _, state = prefill(model, ids[:, :P])
            times = []
            for t in range(P, P + spec["decode_steps"]):
                t0 = time.perf_counter()
                decode_step(model, ids[:, t], state)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        times = times[2:]  # warm-up
        out.update(prompt_len=P, decode_ms=1000 * statistics.median(times),
                   decode_times_ms=[1000 * t for t in times])
    return out


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--segment-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps (after 1 warm-up)")
    ap.add_argument("--decode-prompts", nargs="*", type=int, default=[1024, 16384])
    ap.add_argument("--decode-variants", nargs="*", default=["llp", "gpt"])
    ap.add_argument("--decode-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per measurement (0: torch default); 1 gives "
                         "stable medians on a shared CPU box")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "attention_scaling.json"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "device": args.device, "python": platform.python_version()},
               "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
               "step": [], "decode": []}
    try:
        import torch

        results["machine"]["torch"] = torch.__version__
        results["machine"]["torch_threads"] = args.threads or torch.get_num_threads()
    except ImportError:
        pass
    for N in args.lengths:
        for v in args.variants:
            spec = dict(kind="step", model=model_fields(v, N, args), device=args.device,
                        batch=args.batch, repeats=args.repeats, threads=args.threads)
            r = run_child(spec, args.timeout)
            r.setdefault("variant", v)
            r.setdefault("N", N)
            results["step"].append(r)
            print(f"step   {v:24s} N={N:6d} " + (
                f"{r['step_s']:8.3f} s  peak {r['peak_mem_mib']:8.1f} MiB" if "step_s" in r
                else r["error"]), flush=True)
    for v in args.decode_variants:
        for P in args.decode_prompts:
            fields = model_fields(v, max(P + args.decode_steps + 1, args.segment_len), args)
            if v == "llp":  # LLP decodes beyond seq_len: keep the model's window at 1k
                fields = model_fields(v, 4 * args.segment_len, args)
            elif v == "gpt":
                fields["seq_len"] = P + args.decode_steps + 1
            spec = dict(kind="decode", model=fields, device=args.device, prompt_len=P,
                        decode_steps=args.decode_steps, threads=args.threads)
            r = run_child(spec, args.timeout)
            r.setdefault("variant", v)
            r.setdefault("prompt_len", P)
            results["decode"].append(r)
            print(f"decode {v:24s} P={P:6d} " + (
                f"{r['decode_ms']:8.3f} ms/token" if "decode_ms" in r else r["error"]),
                flush=True)
    results["ratios"] = ratios(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    print(json.dumps(results["ratios"], indent=1))
    print(f"wrote {out}")
    return 0


def ratios(results: dict) -> dict:
    step = {(r["variant"], r["N"]): r for r in results["step"] if "step_s" in r}
    out = {"time_vs_gpt": {}, "mem_vs_gpt": {}, "targets": {}}
    for (v, N), r in sorted(step.items()):
        g = step.get(("gpt", N))
        if g and v != "gpt":
            out["time_vs_gpt"].setdefault(v, {})[N] = r["step_s"] / g["step_s"]
            if g["peak_mem_mib"] > 0:
                out["mem_vs_gpt"].setdefault(v, {})[N] = r["peak_mem_mib"] / g["peak_mem_mib"]
    t = out["targets"]
    if ("llp", 16384) in step and ("gpt", 16384) in step:
        x = step[("llp", 16384)]["step_s"] / step[("gpt", 16384)]["step_s"]
        t["llp_16k_over_gpt_16k"] = {"value": x, "target": 0.2, "met": x <= 0.2}
    if ("llp", 16384) in step and ("llp", 2048) in step:
        x = step[("llp", 16384)]["step_s"] / step[("llp", 2048)]["step_s"]
        t["llp_16k_over_llp_2k"] = {"value": x, "target": 9.0, "met": x <= 9.0}
    dec = {(r["variant"], r["prompt_len"]): r for r in results["decode"] if "decode_ms" in r}
    if ("llp", 16384) in dec and ("llp", 1024) in dec:
        x = dec[("llp", 16384)]["decode_ms"] / dec[("llp", 1024)]["decode_ms"]
        t["llp_decode_16k_over_1k"] = {"value": x, "target": 1.2, "met": x <= 1.2}
    return out


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
