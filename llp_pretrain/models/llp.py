"""LLP (Long LoRA Perceiver) attention: segment pairs with a fixed ``(L, 2L)`` mask.

arXiv:2412.06106, section on LLP (ECP in v2). The window is split into segments of ``L`` tokens.
Segment 0 runs causal self-attention within itself; segment ``s >= 1`` attends to all ``L``
keys of segment ``s - 1`` plus the causal part of itself (``pair_attention.py``: batched
``(L, 2L)`` problems, so no ``N x N`` score matrix is ever built and time and memory are
linear in ``N`` for a fixed ``L``).

Sequence parallelism: with a ``seq_parallel`` object, ``x`` is this rank's chunk (a whole number
of segments); each layer calls ``seq_parallel.exchange_halo(k_last, v_last)`` with the keys and
values ``(B, Hkv, L, d)`` of its last local segment (``v_last`` is None with ``shared_kv``) and gets
the previous rank's ``(k_prev, v_prev)`` or None; the first local segment then attends to that
halo like any segment ``s >= 1``.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import AttentionBase, ForwardContext
from .pair_attention import pair_attention, pair_bias


class LLPAttention(AttentionBase):
    """Segment-pair attention of one LLP layer; input ``(B, S*L, D)``, output ``(B, S*L, D)``."""

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.segment_len = cfg.segment_len
        pair_bias(cfg.segment_len)  # built outside any dispatch mode (see pair_bias)
        if cfg.separate_first_segment_proj:
            self.out_proj_first = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, L = x.shape[1], self.segment_len
        if T % L != 0:
            raise ValueError(f"LLP layer input length {T} is not a multiple of segment_len {L}")
        pos = torch.arange(ctx.offset, ctx.offset + T, device=x.device)
        q = self.queries(x, pos)
        k, v = self.keys_values(x, pos)
        shared = v is k
        halo = None
        if ctx.seq_parallel is not None:
            halo = ctx.seq_parallel.exchange_halo(
                k[:, :, T - L:].contiguous(), None if shared else v[:, :, T - L:].contiguous()
            )
        if ctx.cache is not None:
            ctx.cache.store(self.layer, k, v, ctx.n_tokens)
        p = self.dropout if self.training else 0.0
        o = pair_attention(q, k, v, L, self.head_dim ** -0.5, halo=halo, dropout_p=p)
        m = self.merge_heads(o)
        if halo is None and hasattr(self, "out_proj_first"):
            return torch.cat([self.out_proj_first(m[:, :L]), self.out_proj(m[:, L:])], dim=1)
        return self.out_proj(m)

    def decode(self, x: torch.Tensor, position: int, cache) -> torch.Tensor:
        """One new token ``x`` ``(B, 1, D)`` at global ``position``; at most ``2L`` cached keys."""
        pos = torch.tensor([position], device=x.device)
        q = self.queries(x, pos)
        k, v = self.keys_values(x, pos)
        keys, values = cache.append(self.layer, k, v, position)
        o = self.attend(q, keys, values)
        m = self.merge_heads(o)
        if position < self.segment_len and hasattr(self, "out_proj_first"):
            return self.out_proj_first(m)
        return self.out_proj(m)


class LLPCache:
    """Generation cache of an LLP model: per layer a ``(B, Hkv, 2L, d)`` buffer holding the
    previous complete segment (rows ``[0, L)``) and the current one (rows ``[L, L + len)``).

    Memory is ``2 * n_layers * 2L * Hkv * d`` values per row whatever the text length
    (``Hkv = n_kv_heads``); each decode step attends to at most ``2L`` keys, so time per token
    is flat, beyond ``seq_len`` too.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, segment_len: int,
                 dtype=torch.float32, device=None):
        L = segment_len
        shape = (batch, n_heads, 2 * L, head_dim)
        self.L = L
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.cur_len = [0] * n_layers
        self.has_prev = [False] * n_layers

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Prefill: from ``k, v`` ``(B, H, T, d)`` keep the segment of token ``n - 1`` and the
        one before it."""
        L = self.L
        cur = (n - 1) // L
        cur_len = n - cur * L
        self.k[layer][:, :, L:L + cur_len] = k[:, :, cur * L:n]
        self.v[layer][:, :, L:L + cur_len] = v[:, :, cur * L:n]
        if cur >= 1:
            self.k[layer][:, :, :L] = k[:, :, (cur - 1) * L:cur * L]
            self.v[layer][:, :, :L] = v[:, :, (cur - 1) * L:cur * L]
        self.cur_len[layer] = cur_len
        self.has_prev[layer] = cur >= 1

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, position: int):
        """Add the token at ``position``; return the keys/values it attends to
        ``(B, Hkv, <=2L, d)``."""
        L = self.L
        if position % L == 0 and position > 0:
            # the current segment is complete: it becomes the previous one
            self.k[layer][:, :, :L] = self.k[layer][:, :, L:].clone()
            self.v[layer][:, :, :L] = self.v[layer][:, :, L:].clone()
            self.has_prev[layer] = True
            self.cur_len[layer] = 0
        n = self.cur_len[layer]
        self.k[layer][:, :, L + n:L + n + 1] = k
        self.v[layer][:, :, L + n:L + n + 1] = v
        self.cur_len[layer] = n + 1
        lo = 0 if self.has_prev[layer] else L
        return self.k[layer][:, :, lo:L + n + 1], self.v[layer][:, :, lo:L + n + 1]
