"""Load the arXiv:2412.06106 authors' parameters into a reference-mode ``LMModel``.

Reference mode = the options that reproduce the authors' implementation:
``shared_kv`` (one ``to_kv``: rotated, normed keys are also the values), ``kv_layernorm``
(per-head LayerNorm after RoPE; variants 2-5; LLP computes it but never uses it),
``rope_layers`` (``first``; ``all`` for ``history_self_attention``),
``separate_first_segment_proj`` (LLP's ``to_out_0``) and, for compressed history,
``compressed_history_residual='truncate'``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .config import ModelConfig
from .model import LMModel, build_model

#: reference hyper-parameter keys that are not model sizes
_IGNORED_HYPER = {"batch", "causal"}


def reference_config(variant: str, hyper: Mapping) -> ModelConfig:
    """``ModelConfig`` of a reference model from its ``hyper`` dict (``meta.json`` layout:
    ``num_unique_tokens, dim, num_layers, heads, sequence_len, latent_len, num_segments,
    compression_size, ff_mult, ff_dropout, attn_dropout``).

    ``num_segments`` means the whole window's segments for ``llp`` but the *history* segments
    for ``segmented_history``. Raises ``ValueError`` naming unknown keys.
    """
    known = {"num_unique_tokens", "dim", "num_layers", "heads", "sequence_len", "latent_len",
             "num_segments", "compression_size", "ff_mult", "ff_dropout", "attn_dropout"}
    unknown = set(hyper) - known - _IGNORED_HYPER
    if unknown:
        raise ValueError(f"unknown reference hyper-parameter(s) {sorted(unknown)}")
    if hyper.get("causal", True) is not True:
        raise ValueError("reference hyper 'causal' must be True")
    fields = dict(
        variant=variant,
        vocab_size=int(hyper["num_unique_tokens"]),
        d_model=int(hyper["dim"]),
        n_heads=int(hyper["heads"]),
        n_layers=int(hyper["num_layers"]),
        seq_len=int(hyper["sequence_len"]),
        mlp_ratio=int(hyper.get("ff_mult", 4)),
        dropout=float(max(hyper.get("ff_dropout", 0.0), hyper.get("attn_dropout", 0.0))),
        shared_kv=True,
        kv_layernorm=variant != "llp" and variant != "gpt",
        rope_layers="all" if variant == "history_self_attention" else "first",
    )
    if variant == "gpt":
        raise ValueError("the reference has no 'gpt' model")
    if variant != "llp":
        fields["latent_len"] = int(hyper["latent_len"])
    if variant == "llp":
        fields["n_segments"] = int(hyper["num_segments"])
        fields["separate_first_segment_proj"] = True
    if variant == "segmented_history":
        fields["history_segments"] = int(hyper["num_segments"])
    if variant == "compressed_history":
        fields["compression_len"] = int(hyper["compression_size"])
        fields["compressed_history_residual"] = "truncate"
    return ModelConfig(**fields)


def _reference_name_map(cfg: ModelConfig) -> dict:
    """Reference parameter name -> our parameter name (None: present but unused, dropped)."""
    out = {"token_emb.weight": "tok_emb.weight",
           "to_logits.0.weight": "final_norm.weight", "to_logits.0.bias": "final_norm.bias",
           "to_logits.1.weight": "lm_head.weight", "to_logits.1.bias": "lm_head.bias"}
    proj = "w_out" if cfg.variant in ("perceiver_ar", "compressed_history") else "to_out"
    for i in range(cfg.n_layers):
        r, o = f"layers.{i}", f"blocks.{i}"
        for wb in ("weight", "bias"):
            out[f"{r}.0.norm.{wb}"] = f"{o}.attn_norm.{wb}"
            out[f"{r}.1.norm.{wb}"] = f"{o}.mlp_norm.{wb}"
            out[f"{r}.1.fn.net.0.{wb}"] = f"{o}.mlp.fc1.{wb}"
            out[f"{r}.1.fn.net.3.{wb}"] = f"{o}.mlp.fc2.{wb}"
            out[f"{r}.0.fn.{proj}.{wb}"] = f"{o}.attn.out_proj.{wb}"
            out[f"{r}.0.fn.norm.{wb}"] = f"{o}.attn.kv_norm.{wb}" if cfg.kv_layernorm else None
            if cfg.variant == "llp":
                out[f"{r}.0.fn.to_out_0.{wb}"] = f"{o}.attn.out_proj_first.{wb}"
            if cfg.variant == "compressed_history":
                # the reference builds Linear(h, c) in every layer but uses it in layer 0 only
                out[f"{r}.0.fn.projection_hist.{wb}"] = (
                    f"{o}.attn.hist_proj.{wb}" if i == 0 else None)
        out[f"{r}.0.fn.to_q.weight"] = f"{o}.attn.q_proj.weight"
        out[f"{r}.0.fn.to_kv.weight"] = f"{o}.attn.kv_proj.weight"
        out[f"{r}.0.fn.pos_emb.freqs"] = f"{o}.attn.inv_freq"
    return out


def from_reference_state_dict(variant: str, state: Mapping, hyper: Mapping) -> LMModel:
    """Build a reference-mode model of ``variant`` and load the reference parameters.

    ``state`` maps reference names (``meta.json``'s ``params``, e.g. ``layers.0.0.fn.to_kv.weight``)
    to arrays or tensors; ``hyper`` is ``meta.json``'s ``hyper`` dict. RoPE inverse
    frequencies are taken from ``pos_emb.freqs``. Returns the model in eval mode, fp32.
    Raises ``KeyError`` naming missing or unexpected parameters and ``ValueError`` on shape
    mismatches.
    """
    cfg = reference_config(variant, hyper)
    model = build_model(cfg)
    names = _reference_name_map(cfg)
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise KeyError(
            f"reference state for {variant!r} does not match: missing {missing}, "
            f"unexpected {unexpected}"
        )
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    loaded = set()
    with torch.no_grad():
        for ref_name, our_name in names.items():
            if our_name is None:
                continue
            val = state[ref_name]
            t = torch.as_tensor(np.asarray(val), dtype=torch.float32)
            dst = own[our_name]
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(
                    f"reference parameter {ref_name} has shape {tuple(t.shape)}, "
                    f"expected {tuple(dst.shape)} for {our_name}"
                )
            dst.copy_(t)
            loaded.add(our_name)
    not_loaded = sorted(n for n, _ in model.named_parameters() if n not in loaded)
    if not_loaded:
        raise KeyError(f"parameters not set from the reference state: {not_loaded}")
    return model.eval()
