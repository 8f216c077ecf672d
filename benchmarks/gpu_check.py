"""GPU check: bf16 LLP at seq_len 8192 for about 50 steps under DeepSpeed ZeRO-2, then one JSON line
with tokens/s, MFU, peak memory and the scaled-dot-product-attention kernel that ran.

    python benchmarks/gpu_check.py [--toy] [--steps 50] [--nproc N] [--workdir DIR] [--out FILE]

Default: ``configs/llp_125m.yaml`` (LLP ~125M, seq_len 8192, segment_len 512) on synthetic shards,
``train.precision: bf16``, ``configs/deepspeed/zero2.json``, micro-batch 4 per process, one process
per visible GPU (torchrun) or one process. ``--toy``: the same pipeline at a toy size (seq_len 256,
2 layers, d_model 64, 6 steps) so it runs on a CPU in a minute and cannot rot (tests run it).
The figures are medians over the logged steps after the first log interval (start-up excluded).
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

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_config(toy: bool, data: Path, out: Path, steps: int) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "llp_125m.yaml").read_text())
    cfg["data"].update(path=str(data), num_workers=2, shuffle_buffer=16, val_samples=4)
    cfg["train"].update(max_steps=steps, micro_batch_size=4, precision="bf16", log_interval=5 if not toy else 2,
                        eval_interval=0, save_interval=0, warmup_steps=10, sample_tokens=0)
    cfg["train"].pop("global_batch_size", None)
    cfg["train"]["grad_accum_steps"] = 1
    cfg["deepspeed"] = str(REPO / "configs" / "deepspeed" / "zero2.json")
    cfg["run"] = {"output_dir": str(out)}
    if toy:
        cfg["model"].update(vocab_size=512, d_model=64, n_heads=2, n_layers=2, seq_len=256, segment_len=64)
        cfg["train"]["micro_batch_size"] = 2
        cfg["data"]["num_workers"] = 0
    return cfg


def write_data(cfg: dict, data: Path, samples: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_runs import write_tiny_dataset  # synthetic WebDataset shards + manifest

    if not (data / "manifest.json").is_file():
        write_tiny_dataset(data, seq_len=cfg["model"]["seq_len"], train_samples=[samples], val_samples=[8],
                           vocab_size=cfg["model"]["vocab_size"])


def sdpa_kernels(cfg: dict) -> list:
    """Names of the SDPA aten ops one forward of the configured model runs (torch profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llp_pretrain.models import ModelConfig, build_model

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    model = build_model(ModelConfig(**cfg["model"])).to(dev)
    dtype = torch.bfloat16
    x = torch.randint(4, cfg["model"]["vocab_size"], (1, cfg["model"]["seq_len"]), device=dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype), profile(activities=acts) as prof:
        model(x)
    names = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "flash" in e.key.lower()
             or "efficient_attention" in e.key or "cudnn_attention" in e.key}
    return sorted(names)


def scalars(run: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="toy size, runs on a CPU")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50; toy 6)")
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: visible GPUs, or 1)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import torch

    steps = args.steps or (6 if args.toy else 50)
    nproc = args.nproc or max(1, torch.cuda.device_count())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llp-gpucheck-"))
    cfg = run_config(args.toy, work / "data", work / "run", steps)
    write_data(cfg, work / "data", steps * cfg["train"]["micro_batch_size"] * nproc + 8)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = str(Path(sys.executable).with_name("llp-pretrain"))
    cmd = [cli, "train", "--config", str(work / "config.yaml"), "--overwrite"]
    if nproc > 1:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(nproc),
               "--no-python", *cmd]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, env=env, cwd=REPO, text=True, capture_output=True)
    (work / "train.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        print(f"gpu_check: training failed (exit {p.returncode}); log: {work / 'train.log'}\n{p.stderr[-3000:]}",
              file=sys.stderr)
        return 1
    run = work / "run"
    tok, mfu, mem = (scalars(run, t)[1:] or scalars(run, t) for t in
                     ("train/tokens_per_sec", "train/mfu", "train/memory_gb"))
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "processes": nproc,
           "toy": args.toy, "seq_len": cfg["model"]["seq_len"], "steps": steps, "zero_stage": 2, "precision": "bf16",
           "tokens_per_sec": statistics.median(tok), "mfu": statistics.median(mfu),
           "peak_flops_per_process": (scalars(run, "train/peak_flops") or [None])[-1],
           "peak_memory_gb": max(mem), "sdpa_kernels": sdpa_kernels(cfg)}
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
