"""Analytic training FLOPs (forward + backward) for MFU reporting.

Convention (documented in ``docs/models.md``): a multiply-add is 2 FLOPs; backward costs twice
the forward, so training = 3 x forward. Counted per layer: the q, k/v and output projections on
the rows that compute them (k/v ``D x Hkv d`` with ``n_kv_heads``), the MLP
(``2 * 2 * D * h_mlp`` per row for ``gelu``, ``2 * 3 * D * h_mlp`` for ``swiglu``,
``h_mlp = cfg.mlp_hidden``), the compressed-history ``Linear(h, c)``, and attention as
``4 * D`` FLOPs per *visible* (unmasked) query-key pair (``q k^T`` and ``p v``; the same with
grouped-query heads). Plus the output head ``2 * D * V``
per output row. The embedding lookup, norms, biases, activations, softmax and RoPE are not
counted, nor recomputation (activation checkpointing, the chunked loss's head). The result is
divided by the ``N`` input tokens.
"""
from __future__ import annotations

from .config import ModelConfig


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _linear_layer_flops(cfg: ModelConfig, rows_q: int, rows_kv: int, rows_out: int) -> float:
    D = cfg.d_model
    Dkv = cfg.kv_heads * cfg.head_dim  # grouped-query: narrower key/value projections
    kv = 1 if cfg.shared_kv else 2
    proj = 2 * D * (D * rows_q + kv * Dkv * rows_kv + D * rows_out)
    n_mat = 3 if cfg.mlp == "swiglu" else 2  # gate, up, down vs fc1, fc2
    mlp = 2 * n_mat * D * cfg.mlp_hidden * rows_out
    return proj + mlp


def visible_pairs(cfg: ModelConfig, N: int, layer: int) -> int:
    """Unmasked query-key pairs of attention layer ``layer`` for an ``N``-token window."""
    v = cfg.variant
    if v == "gpt":
        return _causal_pairs(N)
    if v == "llp":
        L = cfg.segment_len
        full, rem = divmod(N, L)
        total = 0
        for s in range(full + (1 if rem else 0)):
            n = L if s < full else rem
            total += _causal_pairs(n) + (L * n if s > 0 else 0)
        return total
    m = min(cfg.latent_len, N)
    h = N - m
    lat = m * h + _causal_pairs(m)
    if v == "perceiver_ar":
        return lat if layer == 0 else _causal_pairs(m)
    if v == "history_self_attention":
        return lat + h * h
    if v == "segmented_history":
        return lat + h * h // cfg.history_segments
    if v == "compressed_history":
        if layer == 0:
            return lat + h * h
        c = cfg.compression_len
        return m * c + _causal_pairs(m) + c * c
    raise ValueError(f"unknown variant {v!r}")


def forward_flops_breakdown(cfg: ModelConfig, N: int) -> dict:
    """Forward FLOPs of one ``N``-token window (batch 1): ``{"linear": ..., "attention": ...}``.

    ``linear``: projections, MLPs, the compressed-history ``Linear(h, c)`` (twice with the
    default ``compress`` residual) and the output head; ``attention``: ``4 D`` per visible pair.
    """
    v, D = cfg.variant, cfg.d_model
    linear = attention = 0.0
    m = min(cfg.latent_len or N, N)
    h = N - m
    for i in range(cfg.n_layers):
        attention += 4 * D * visible_pairs(cfg, N, i)
        if v in ("gpt", "llp", "history_self_attention", "segmented_history"):
            linear += _linear_layer_flops(cfg, N, N, N)
        elif v == "perceiver_ar":
            linear += _linear_layer_flops(cfg, m, N if i == 0 else m, m)
        elif v == "compressed_history":
            c = cfg.compression_len
            if i == 0:
                n_proj = 2 if cfg.compressed_history_residual == "compress" else 1
                linear += _linear_layer_flops(cfg, N, N, c + m) + n_proj * 2 * h * c * D
            else:
                linear += _linear_layer_flops(cfg, c + m, c + m, c + m)
    out_rows = N if v in ("gpt", "llp") else m
    linear += 2 * D * cfg.vocab_size * out_rows
    return {"linear": linear, "attention": attention}


def forward_flops(cfg: ModelConfig, N: int) -> float:
    """Forward FLOPs of one ``N``-token window (batch 1)."""
    b = forward_flops_breakdown(cfg, N)
    return b["linear"] + b["attention"]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward = 3 x forward) FLOPs per input token of a ``seq_len``
    window: ``3 * forward_flops(cfg, seq_len) / seq_len``."""
    return 3.0 * forward_flops(cfg, seq_len) / seq_len
