"""``llp-pretrain quickstart``: the whole pipeline on the bundled King James Bible in one command.

1. SentencePiece tokenizer (BPE, 2,000 pieces) on ``data_prep/data/kjv.txt.gz`` (chapters as documents);
2. WebDataset shards (seq_len from ``configs/quickstart.yaml``, 2 % of documents held out for validation);
3. training of the tiny LLP of ``configs/quickstart.yaml`` for a time budget (``--minutes``; the number
   of steps is set from a measured step time so the cosine schedule completes); on a GPU a larger model;
4. strided validation perplexity, next to a unigram model of the same tokenizer's training tokens
   scored on exactly the same validation targets;
5. a generated sample and the ``tensorboard --logdir`` command.

Everything is written under ``OUT`` (``data/tokenizer``, ``data/shards``, ``run``); rerunning reuses
the tokenizer and shards.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["run_quickstart", "measure_step_time"]

VOCAB = 2000
GPU_OVERRIDES = ["model.d_model=384", "model.n_heads=6", "model.n_layers=6", "model.seq_len=512",
                 "model.segment_len=128", "train.micro_batch_size=32", "train.global_batch_size=32",
                 "train.lr=1.5e-3"]


def measure_step_time(cfg, device: torch.device, steps: int = 3) -> float:
    """Seconds per optimizer step of ``cfg``'s model at its micro-batch (forward+backward+AdamW, no
    DeepSpeed), fastest of ``steps`` after one warm-up step."""
    from llp_pretrain.models import build_model, lm_loss

    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(4, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1), device=device)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        for _ in range(cfg.train.grad_accum_steps):
            loss, n = lm_loss(model, x)
            (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return float(min(times))


def _prepare_data(out: Path, seq_len: int) -> Dict[str, Path]:
    from llp_pretrain.prepare import prepare_dataset

    steps = iter(("1/5", "2/5"))
    return prepare_dataset(out / "data", seq_len, vocab_size=VOCAB, val_fraction=0.02,
                           log=lambda msg: print(f"[quickstart] {next(steps, '')} {msg}", flush=True))


MIN_STEPS = 400  # fewer do not reliably reach 2x below the unigram perplexity on this corpus


def run_quickstart(out: str = "runs/quickstart", minutes: Optional[float] = None, steps: Optional[int] = None,
                   require_margin: bool = True) -> Dict:
    """Run the quickstart (see module doc). Returns a dict with the measured results:
    ``val`` (model), ``unigram``, ``steps``, ``sample``, ``run_dir``.

    Raises ``RuntimeError`` if the model does not beat the unigram baseline by at least 2x in perplexity."""
    from llp_pretrain.cli import evaluate_checkpoint, generate_text
    from llp_pretrain.config import load_config
    from llp_pretrain.data import read_split_stream
    from llp_pretrain.engine import train
    from llp_pretrain.evaluate import bytes_per_token, unigram_eval

    out = Path(out).resolve()
    cuda = torch.cuda.is_available()
    minutes = minutes if minutes is not None else (10.0 if cuda else 4.0)
    overrides = list(GPU_OVERRIDES if cuda else [])
    base = load_config("configs/quickstart.yaml", overrides + ["model.vocab_size=2000"], world_size=1, check_data=False)
    paths = _prepare_data(out, base.model.seq_len)
    run_dir = out / "run"
    overrides += [f"data.path={paths['shards']}", f"data.tokenizer={paths['tokenizer']}", f"run.output_dir={run_dir}"]
    cfg = load_config("configs/quickstart.yaml", overrides, world_size=1)
    device = torch.device("cuda" if cuda else "cpu")
    budget = 60.0 * minutes
    existing = run_dir / "checkpoints" / "latest"
    continuing = steps is None and existing.is_file() and (run_dir / "config.resolved.yaml").is_file()
    if continuing and (run_dir / "config.resolved.yaml").is_file():
        # an earlier quickstart planned this run: continue it to its planned length (a finished run
        # is only evaluated); changing max_steps would change its LR schedule mid-run
        import yaml

        steps = int(yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["train"]["max_steps"])
        print(f"[quickstart] 3/5 continuing the run in {run_dir} to its planned {steps} steps "
              f"(delete that directory to train a new one)", flush=True)
    step_time = measure_step_time(cfg, device) if steps is None else float("nan")
    if steps is None:
        steps = max(MIN_STEPS, int(0.85 * budget / (step_time * 1.15)))  # DeepSpeed/eval/logging overhead ~15 %
        if steps * step_time > 1.2 * budget:
            print(f"[quickstart] note: this machine needs {step_time:.2f} s/step; the {MIN_STEPS} steps the quickstart "
                  f"needs take ~{steps * step_time / 60:.1f} min (is it busy?)", flush=True)
        print(f"[quickstart] 3/5 training {cfg.model.variant} ({'GPU' if cuda else 'CPU'}): measured {step_time:.3f} "
              f"s/step -> {steps} steps (~{steps * step_time / 60:.1f} min)", flush=True)
    elif not continuing:
        print(f"[quickstart] 3/5 training {cfg.model.variant} ({'GPU' if cuda else 'CPU'}) for {steps} steps", flush=True)
    sets = [f"train.max_steps={steps}", f"train.warmup_steps={max(2, min(30, steps // 20))}",
            f"train.eval_interval={max(10, steps // 4)}", f"train.save_interval={max(10, steps // 4)}",
            f"train.log_interval={max(1, min(20, steps // 10))}"]
    cfg = load_config("configs/quickstart.yaml", overrides + sets, world_size=1)
    res = train(cfg, resume="auto" if existing.is_file() else None)

    print("[quickstart] 4/5 evaluating validation perplexity (strided, stride seq_len/2)", flush=True)
    n = cfg.model.seq_len
    val = evaluate_checkpoint(str(run_dir), str(paths["shards"]), "val", stride=n // 2)
    train_stream = read_split_stream(str(paths["shards"]), "train")
    counts = np.bincount(train_stream, minlength=cfg.model.vocab_size)
    val_stream = read_split_stream(str(paths["shards"]), "val")
    uni = unigram_eval(counts, val_stream[1:], bytes_per_token(cfg.manifest, "val"))  # the same targets
    assert uni.tokens == val.tokens, (uni.tokens, val.tokens)
    print(f"[quickstart] validation: {val.tokens} tokens | LLP perplexity {val.ppl:.2f} "
          f"(loss {val.loss:.3f}, {val.bits_per_byte:.3f} bits/byte) | unigram perplexity {uni.ppl:.2f} "
          f"({uni.bits_per_byte:.3f} bits/byte) | {uni.ppl / val.ppl:.1f}x lower", flush=True)

    prompt = cfg.train.sample_prompt
    sample = generate_text(str(run_dir), prompt, 60, temperature=0.8, top_k=40, seed=0)
    print(f"[quickstart] 5/5 sample (prompt {prompt!r}):\n{sample}\n", flush=True)
    print(f"[quickstart] view the run:  tensorboard --logdir {run_dir / 'tensorboard'}", flush=True)
    if require_margin and not uni.ppl >= 2.0 * val.ppl:
        raise RuntimeError(f"the model's validation perplexity {val.ppl:.2f} does not beat the unigram baseline "
                           f"{uni.ppl:.2f} by 2x; train longer (--minutes)")
    return {"val": val.to_dict(), "unigram": uni.to_dict(), "steps": res.step, "sample": sample,
            "run_dir": str(run_dir), "step_time": step_time}
