"""The ``README.md`` model card of an exported directory, from the checkpoint and its run directory.

Facts come from the checkpoint's ``run_meta.json`` (step, consumed samples, data manifest hash),
its model config, and the run's TensorBoard scalars ``val/loss`` and ``val/bits_per_byte`` (the
last evaluation at or before the checkpoint's step); what is not available is written as such.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional


def last_validation(run_dir: Path, step: int) -> Dict[str, float]:
    """``{"loss": ..., "bits_per_byte": ..., "step": ...}`` of the last ``val/*`` scalars logged at or
    before ``step`` in ``run_dir/tensorboard`` ({} when there are none)."""
    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags().get("scalars", []))
    out: Dict[str, float] = {}
    for key, tag in (("loss", "val/loss"), ("bits_per_byte", "val/bits_per_byte")):
        if tag in tags:
            ev = [e for e in ea.Scalars(tag) if e.step <= step]
            if ev:
                out[key] = float(ev[-1].value)
                out["step"] = int(ev[-1].step)
    return out


def _fmt(v: Optional[float], spec: str = ".4f") -> str:
    return "not recorded" if v is None else format(v, spec)


def model_card(model_cfg: Dict, meta: Dict, n_params: int, run_dir: Path, tokenizer: bool) -> str:
    """Markdown text of the model card."""
    step = int(meta.get("step", 0))
    seq_len = int(model_cfg["seq_len"])
    samples = meta.get("consumed_samples")
    tokens = None if samples is None else int(samples) * seq_len
    val = last_validation(run_dir, step)
    hashes = meta.get("hashes") or {}
    arch = {"llp": f"LLP (Long LoRA Perceiver, arXiv:2412.06106): segment-pair attention, segment_len "
                   f"{model_cfg.get('segment_len')}", "gpt": "dense causal transformer (GPT baseline)"}
    sizes = "\n".join(f"| {k} | {model_cfg[k]} |" for k in sorted(model_cfg) if model_cfg[k] is not None)
    lines = [
        "---", "library_name: transformers", "tags: [llp-pretrain, causal-lm]", "---", "",
        f"# llp-pretrain {model_cfg['variant']} model (step {step})", "",
        f"Architecture: {arch.get(model_cfg['variant'], model_cfg['variant'])}; {model_cfg['n_layers']} layers, "
        f"d_model {model_cfg['d_model']}, {model_cfg['n_heads']} heads, trained window seq_len {seq_len}, "
        f"vocabulary {model_cfg['vocab_size']}. Parameters: {n_params:,}.", "",
        "| field | value |", "| --- | --- |", sizes, "",
        "## Training", "",
        f"- optimizer steps: {step}",
        f"- training tokens: {'not recorded' if tokens is None else f'{tokens:,}'} ({samples} samples x {seq_len})",
        f"- data manifest sha256: {hashes.get('manifest_sha256', 'not recorded')}",
        f"- tokenizer sha256: {hashes.get('tokenizer_sha256', 'not recorded')}",
        f"- validation loss (nats/token): {_fmt(val.get('loss'))}"
        + (f" at step {val['step']}" if 'step' in val else ""),
        f"- validation bits per byte: {_fmt(val.get('bits_per_byte'))}", "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "tok = AutoTokenizer.from_pretrained(PATH)" if tokenizer else "# no tokenizer was saved with this run",
        "```", "",
        "The modeling code in this directory (`modeling_llp_pretrain.py`, `llp_models_*.py`) is generated from "
        "llp-pretrain's `llp_pretrain/models` package; it needs `torch`, `transformers` and `pydantic`, not "
        "llp-pretrain. The tokenizer encodes as the run's SentencePiece model (no BOS/EOS added).", "",
    ]
    return "\n".join(lines)
