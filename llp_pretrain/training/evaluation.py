"""Evaluation and text samples during training.

:class:`Evaluator` scores this data-parallel rank's share of the validation windows (the same
number of micro-batches on every rank, for ZeRO-3's collective forward) and sums over all ranks;
:func:`sample_text` generates a short continuation of ``train.sample_prompt``.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional

import torch

from llp_pretrain.config import RunConfig, read_manifest
from llp_pretrain.data import DataLayoutError, read_split_stream
from llp_pretrain.evaluate import bytes_per_token, score_windows, summarize, window_plan

from .distributed import all_reduce

__all__ = ["Evaluator", "sample_text", "gather_context", "log_val"]


class Evaluator:
    """Validation loss, perplexity and bits per byte of the model being trained (collective).

    The windows are planned once per source (``data.path``, or each of ``data.sources``):
    ``data.val_samples`` of them, split over the data-parallel ranks. A source without a usable
    validation split gets a warning, printed once, and is left out; with none left :meth:`run`
    returns None on every rank."""

    def __init__(self, cfg: RunConfig, d, engine, console: Callable[[str], None]):
        self.cfg, self.d, self.engine, self.console = cfg, d, engine, console
        self.sources = ([(s.name, s.path, None) for s in cfg.data.sources] if cfg.data.sources
                        else [("", cfg.data.path, cfg.manifest)])
        self._plans: Optional[list] = None

    def _plan(self, name: str, path: str, manifest: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        cfg, d = self.cfg, self.d
        seq_len = cfg.model.seq_len
        trained = self.engine.module.trained_positions(seq_len)
        tlen = trained.stop - trained.start
        try:
            manifest = manifest or read_manifest(path)
            stream_np = read_split_stream(path, "val", manifest, max_samples=cfg.data.val_samples + 1,
                                          verify_checksums=cfg.data.verify_checksums)
            plan = window_plan(len(stream_np), seq_len, tlen, tlen)[: cfg.data.val_samples]
        except (DataLayoutError, ValueError) as e:  # same data on every rank: all skip together
            what = f"source {name!r}" if name else "training"
            self.console(f"[llp-pretrain] warning: no validation during {what} ({e})")
            return None
        return dict(name=name, stream=torch.from_numpy(stream_np), plan=plan[d.dp_rank::d.dp_size], tlen=tlen,
                    bpt=bytes_per_token(manifest, "val"),
                    n_batches=math.ceil(math.ceil(len(plan) / d.dp_size) / cfg.train.micro_batch_size))

    def run(self) -> Optional[Dict[str, Any]]:
        """``{"loss", "ppl", "bits_per_byte", "tokens"}`` over all ranks (and all sources: their
        summed NLL over their summed tokens), plus ``"sources": {name: {...}}`` for ``data.sources``;
        None when no source has a validation split."""
        if self._plans is None:
            self._plans = [p for p in (self._plan(*src) for src in self.sources) if p is not None]
        if not self._plans:
            return None
        d, engine = self.d, self.engine
        engine.eval()
        try:
            sums = [x for c in self._plans for x in score_windows(
                lambda x: engine(x), c["stream"], c["plan"], self.cfg.model.seq_len, c["tlen"],
                self.cfg.train.micro_batch_size, d.device, pad_to=c["n_batches"])]
        finally:
            engine.train()
        sums = all_reduce(sums, device=d.reduce_device)
        # sequence-parallel peers scored the same windows: divide the double count
        parts = [(sums[2 * i] / d.sp_size, int(sums[2 * i + 1] / d.sp_size), c["bpt"]) for i, c in enumerate(self._plans)]
        nll, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
        bpt = sum(p[1] * p[2] for p in parts) / max(n, 1) if all(p[2] for p in parts) else None
        res = summarize(nll, n, bpt).to_dict()
        if self.cfg.data.sources:
            res["sources"] = {c["name"]: summarize(*p).to_dict() for c, p in zip(self._plans, parts)}
        return res


def gather_context(engine, stage: int):
    """Under ZeRO-3, a context in which every rank holds the full parameters; otherwise a no-op."""
    if stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return nullcontext()


def sample_text(engine, cfg: RunConfig, tokenizer_path: Optional[str], stage: int) -> Optional[str]:
    """``train.sample_tokens`` tokens generated from ``train.sample_prompt`` (temperature 0.8, top-k 40,
    seed ``train.seed``), decoded with the run's tokenizer, or token ids when there is none (the prompt
    is then the manifest's EOS id); None when ``train.sample_tokens`` is 0. Generation stops at the
    tokenizer's EOS (from the tokenizer, else the manifest: never a fixed id). Collective under ZeRO-3."""
    t = cfg.train
    if t.sample_tokens <= 0:
        return None
    try:
        import sentencepiece as spm

        sp_model = spm.SentencePieceProcessor(model_file=str(tokenizer_path)) if tokenizer_path else None
    except Exception:
        sp_model = None
    from llp_pretrain.special_ids import fallback_prompt, generation_ids

    prompt = (sp_model.encode(t.sample_prompt) if sp_model else []) or fallback_prompt(cfg.manifest)
    eos_id, pad_id = generation_ids(sp_model, cfg.manifest)
    with gather_context(engine, stage):
        out = engine.module.generate(torch.tensor(prompt), t.sample_tokens, temperature=0.8, top_k=40,
                                     seed=t.seed, eos_id=eos_id, pad_id=pad_id)
    ids = out.tolist()
    return sp_model.decode(ids) if sp_model else " ".join(map(str, ids))


def log_val(monitor, step: int, val: Optional[Dict[str, Any]], sample: Optional[str]) -> None:
    """Write the validation scalars (``val/loss`` ...; ``val/<source>/loss`` ... for ``data.sources``)
    and the sample text at ``step`` to TensorBoard and the console."""
    if val is None:
        return
    for prefix, v in [("val", val), *((f"val/{name}", r) for name, r in val.get("sources", {}).items())]:
        monitor.scalars(step, {f"{prefix}/loss": v["loss"], f"{prefix}/ppl": v["ppl"],
                               f"{prefix}/bits_per_byte": v["bits_per_byte"]})
        bpb = v["bits_per_byte"] if v["bits_per_byte"] is not None else float("nan")
        monitor.console(f"eval  {step:>7d} | {prefix} loss {v['loss']:.4f} | ppl {v['ppl']:.2f} | bpb {bpb:.4f} | "
                        f"{v['tokens']} tokens")
    if sample is not None:
        monitor.text("samples/generated", sample, step)
        monitor.console(f"sample {step:>6d} | {sample!r}")
    monitor.flush()
