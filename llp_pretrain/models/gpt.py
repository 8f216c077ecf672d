"""Dense causal self-attention (variant ``gpt``, the comparison baseline).

Every query at global position ``p`` sees keys ``<= p``; cost per layer ``O(N^2 d H)``.
"""
from __future__ import annotations

import torch

from .layers import AttentionBase, ForwardContext


class CausalSelfAttention(AttentionBase):
    """Full causal self-attention over ``(B, N, D)`` using SDPA's ``is_causal`` kernel."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[1]
        pos = torch.arange(ctx.offset, ctx.offset + T, device=x.device)
        q = self.queries(x, pos)
        k, v = self.keys_values(x, pos)
        if ctx.cache is not None:
            ctx.cache.store(self.layer, k, v, T)
        o = self.attend(q, k, v, causal=True)
        return self.out_proj(self.merge_heads(o))

    def decode(self, x: torch.Tensor, position: int, cache) -> torch.Tensor:
        """One new token ``x`` ``(B, 1, D)`` at ``position`` against the cached keys/values."""
        pos = torch.tensor([position], device=x.device)
        q = self.queries(x, pos)
        k, v = self.keys_values(x, pos)
        keys, values = cache.append(self.layer, k, v)
        o = self.attend(q, keys, values)
        return self.out_proj(self.merge_heads(o))


class GPTCache:
    """Key/value cache of a ``gpt`` model: ``(B, Hkv, capacity, d)`` buffers per layer.

    ``capacity`` is ``seq_len``; the model falls back to re-running the window beyond it.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int,
                 dtype=torch.float32, device=None):
        shape = (batch, n_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = [0] * n_layers
        self.capacity = capacity

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Prefill: keep the first ``n`` rows of ``k, v`` ``(B, H, T, d)``."""
        self.k[layer][:, :, :n] = k[:, :, :n]
        self.v[layer][:, :, :n] = v[:, :, :n]
        self.length[layer] = n

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Add one row; return the valid ``(keys, values)`` views ``(B, H, len, d)``."""
        n = self.length[layer]
        if n >= self.capacity:
            raise RuntimeError(f"GPT cache full ({self.capacity} tokens)")
        self.k[layer][:, :, n:n + 1] = k
        self.v[layer][:, :, n:n + 1] = v
        self.length[layer] = n + 1
        return self.k[layer][:, :, :n + 1], self.v[layer][:, :, :n + 1]
