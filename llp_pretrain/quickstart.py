"""``llp-pretrain quickstart``: the whole pipeline on the bundled King James Bible in one command.

1. SentencePiece tokenizer (BPE, 2,000 pieces) on ``data_prep/data/kjv.txt.gz`` (chapters as documents);
2. WebDataset shards (seq_len from ``configs/quickstart.yaml``, 2 % of documents held out for validation);
3. training of the tiny LLP of ``configs/quickstart.yaml`` for a *fixed* number of steps
   (:data:`CPU_STEPS`), so the same command gives the same model, perplexity and sample on every
   machine (training is deterministic on CPU); a busy or slow machine takes longer and says how long
   (an up-front estimate from a measured step time, then the trainer's running ETA). On a GPU a
   larger model for :data:`GPU_STEPS` steps;
4. strided validation perplexity, next to a unigram model of the same tokenizer's training tokens
   scored on exactly the same validation targets;
5. a generated sample, the ``tensorboard --logdir`` command and the next steps (eval, generate,
   export, your own data).

Everything is written under ``OUT`` (``data/tokenizer``, ``data/shards``, ``run``); rerunning reuses
the tokenizer and shards and continues an unfinished run to its planned length.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["run_quickstart", "measure_step_time", "CPU_STEPS", "GPU_STEPS", "plan_settings"]

VOCAB = 2000
GPU_OVERRIDES = ["model.d_model=384", "model.n_heads=6", "model.n_layers=6", "model.seq_len=512",
                 "model.segment_len=128", "train.micro_batch_size=32", "train.global_batch_size=32",
                 "train.lr=1.5e-3"]
#: Steps of the CPU quickstart. Basis: 5,500 steps x 8 windows x 128 tokens = 5.6 M tokens; the
#: training throughput measured on an idle 2-core CPU machine is ~24k tokens/s (README, "Measured
#: numbers"), so about 3.9 minutes of training. Not derived from this machine's speed.
CPU_STEPS = 5500
#: Steps of the GPU quickstart (larger model, 16,384 tokens per step); not yet measured on a GPU.
GPU_STEPS = 3000
#: the CPU throughput the plan was sized with (tokens/s, idle 2-core machine; see CPU_STEPS)
REFERENCE_TOKENS_PER_SEC = 24_000


def measure_step_time(cfg, device: torch.device, steps: int = 3) -> float:
    """Seconds per optimizer step of ``cfg``'s model at its micro-batch (forward+backward+AdamW, no
    DeepSpeed), fastest of ``steps`` after one warm-up step. Used only for the ETA shown up front."""
    from llp_pretrain.models import build_model, lm_loss

    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(4, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
                      generator=gen).to(device)
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


def plan_settings(steps: int) -> List[str]:
    """The ``--set`` overrides of a quickstart run of ``steps`` steps (schedule, eval/save/log cadence);
    a function of ``steps`` only, so a given step count always trains the same run."""
    return [f"train.max_steps={steps}", f"train.warmup_steps={max(2, min(30, steps // 20))}",
            f"train.eval_interval={max(10, steps // 4)}", f"train.save_interval={max(10, steps // 4)}",
            f"train.log_interval={max(1, min(100, steps // 50))}"]


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _prepare_data(out: Path, seq_len: int) -> Dict[str, Path]:
    from llp_pretrain.prepare import prepare_dataset

    steps = iter(("1/5", "2/5"))
    return prepare_dataset(out / "data", seq_len, vocab_size=VOCAB, val_fraction=0.02, progress=True,
                           log=lambda msg: _say(f"{next(steps, '')} {msg}"))


def _planned_steps(run_dir: Path, steps: Optional[int], default: int) -> int:
    """The step count: ``steps``, else that of an unfinished earlier quickstart in ``run_dir`` (changing
    it mid-run would change its LR schedule), else ``default``."""
    if steps is not None:
        return steps
    resolved = run_dir / "config.resolved.yaml"
    if (run_dir / "checkpoints" / "latest").is_file() and resolved.is_file():
        import yaml

        planned = int(yaml.safe_load(resolved.read_text())["train"]["max_steps"])
        _say(f"3/5 continuing the run in {run_dir} to its planned {planned} steps (delete that directory to "
             "train a new one)")
        return planned
    return default


def _announce(cfg, device: torch.device, steps: int, cuda: bool, done: int = 0) -> float:
    """Print the plan and an ETA (for the ``steps - done`` steps left) from a short measurement of this
    machine; returns seconds per step."""
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    step_time = measure_step_time(cfg, device)
    eta = (steps - done) * step_time * 1.15  # DeepSpeed, evaluation and logging add ~15 %
    basis = ("" if cuda else f"; ~{steps * tokens / REFERENCE_TOKENS_PER_SEC / 60:.1f} min on an idle 2-core CPU "
             f"at ~{REFERENCE_TOKENS_PER_SEC // 1000}k tokens/s")
    _say(f"3/5 training {cfg.model.variant} ({'GPU' if cuda else 'CPU'}) for {steps} steps x {tokens:,} tokens"
         f"{basis}; this machine now: {step_time:.3f} s/step -> ETA ~{eta / 60:.1f} min"
         + (f" for the {steps - done} steps left" if done else ""))
    if not cuda and tokens / step_time < 0.5 * REFERENCE_TOKENS_PER_SEC:
        _say("note: this machine is slower or busier than the reference; the result is the same, it only takes "
             "longer (the training log shows the remaining time)")
    return step_time


def _next_steps(run_dir: Path, shards: Path, prompt: str) -> str:
    return "\n".join([
        "[quickstart] next steps:",
        f"  evaluate:  llp-pretrain eval --checkpoint {run_dir} --data {shards} --json",
        f"  sample:    llp-pretrain generate --checkpoint {run_dir} --prompt {prompt!r} --max-new-tokens 100",
        f"  export:    llp-pretrain export {run_dir} {run_dir.parent / 'export'}   (safetensors + config + tokenizer)",
        f"  watch:     tensorboard --logdir {run_dir / 'tensorboard'}",
        "  your data: llp-prep tokenizer ... && llp-prep shard ... (docs/data_prep.md), then",
        "             llp-pretrain train --config configs/quickstart.yaml --set data.path=SHARDS "
        "--set run.output_dir=RUN",
    ])


def run_quickstart(out: str = "runs/quickstart", steps: Optional[int] = None, require_margin: bool = True) -> Dict:
    """Run the quickstart (see module doc). ``steps`` replaces the fixed plan (smoke tests). Returns a
    dict with the measured results: ``val`` (model), ``unigram``, ``steps``, ``sample``, ``run_dir``,
    ``step_time`` (the up-front measurement, seconds).

    Raises ``RuntimeError`` if the model does not beat the unigram baseline by at least 2x in perplexity."""
    from llp_pretrain.cli import evaluate_checkpoint, generate_text
    from llp_pretrain.config import load_config
    from llp_pretrain.data import read_split_stream
    from llp_pretrain.engine import train
    from llp_pretrain.evaluate import bytes_per_token, unigram_eval
    from llp_pretrain.training.distributed import destroy_process_group

    from llp_pretrain.config import output_dir_problem

    out = Path(out).resolve()
    if output_dir_problem(out):
        raise ValueError(f"--out: {output_dir_problem(out)}")
    cuda = torch.cuda.is_available()
    overrides = list(GPU_OVERRIDES if cuda else [])
    base = load_config("configs/quickstart.yaml", overrides + ["model.vocab_size=2000"], world_size=1, check_data=False)
    paths = _prepare_data(out, base.model.seq_len)
    run_dir = out / "run"
    overrides += [f"data.path={paths['shards']}", f"data.tokenizer={paths['tokenizer']}", f"run.output_dir={run_dir}"]
    existing = run_dir / "checkpoints" / "latest"
    steps = _planned_steps(run_dir, steps, GPU_STEPS if cuda else CPU_STEPS)
    cfg = load_config("configs/quickstart.yaml", overrides + plan_settings(steps), world_size=1)
    from llp_pretrain.checkpoint import read_latest, step_of

    done = step_of(read_latest(run_dir / "checkpoints") or "") or 0
    step_time = _announce(cfg, torch.device("cuda" if cuda else "cpu"), steps, cuda, done)
    try:
        res = train(cfg, resume="auto" if existing.is_file() else None)
    finally:  # the process group train() formed is not needed for evaluation: gone on every exit path
        destroy_process_group()
    if res.step < steps:  # stopped by a signal (or the time limit): no half-trained result is reported
        _say(f"training stopped at step {res.step} of {steps} ({res.stopped_by}); run the same command again to "
             "continue from the last checkpoint")
        return {"val": None, "unigram": None, "steps": res.step, "sample": None, "run_dir": str(run_dir),
                "step_time": step_time}

    _say("4/5 evaluating validation perplexity (strided, stride seq_len/2)")
    n = cfg.model.seq_len
    val = evaluate_checkpoint(str(run_dir), str(paths["shards"]), "val", stride=n // 2)
    train_stream = read_split_stream(str(paths["shards"]), "train")
    counts = np.bincount(train_stream, minlength=cfg.model.vocab_size)
    val_stream = read_split_stream(str(paths["shards"]), "val")
    uni = unigram_eval(counts, val_stream[1:], bytes_per_token(cfg.manifest, "val"))  # the same targets
    assert uni.tokens == val.tokens, (uni.tokens, val.tokens)
    _say(f"validation: {val.tokens} tokens | LLP perplexity {val.ppl:.2f} (loss {val.loss:.3f}, "
         f"{val.bits_per_byte:.3f} bits/byte) | unigram perplexity {uni.ppl:.2f} ({uni.bits_per_byte:.3f} "
         f"bits/byte) | {uni.ppl / val.ppl:.1f}x lower")

    prompt = cfg.train.sample_prompt
    sample = generate_text(str(run_dir), prompt, 60, temperature=0.8, top_k=40, seed=0)
    _say(f"5/5 sample (prompt {prompt!r}):\n{sample}\n")
    _say(f"view the run:  tensorboard --logdir {run_dir / 'tensorboard'}")
    print(_next_steps(run_dir, paths["shards"], prompt), flush=True)
    if require_margin and not uni.ppl >= 2.0 * val.ppl:
        raise RuntimeError(f"the model's validation perplexity {val.ppl:.2f} does not beat the unigram baseline "
                           f"{uni.ppl:.2f} by 2x after {res.step} steps")
    return {"val": val.to_dict(), "unigram": uni.to_dict(), "steps": res.step, "sample": sample,
            "run_dir": str(run_dir), "step_time": step_time}
