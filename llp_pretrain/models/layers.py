"""Shared building blocks: RoPE, the MLP, projections of one attention layer, the SDPA call.

Every attention in the family computes ``softmax(q k^T * d**-0.5 + mask) v`` with
``torch.nn.functional.scaled_dot_product_attention`` so GPUs get fused kernels; the variants
differ only in which query rows see which key rows (see ``docs/models.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE inverse frequencies ``theta ** (-2i / d)`` for ``i < d/2``: shape ``(d/2,)`` fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_rotations(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations ``exp(i * pos * inv_freq)`` of shape ``(T, d/2)`` (complex64).

    Angles ``pos * inv_freq`` are computed in fp32; rotation ``i`` acts on the interleaved
    pair ``(2i, 2i+1)``, as in the reference's ``rotary-embedding-torch``.
    """
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(..., d)`` by ``rotations`` (complex, broadcast
    against ``(..., d/2)``: ``(T, d/2)`` for ``x`` ``(..., T, d)``, ``(T, 1, d/2)`` for
    ``(B, T, H, d)``).

    Pair ``(x0, x1)`` becomes ``(x0 cos - x1 sin, x1 cos + x0 sin)``: one complex product in
    fp32 (a single elementwise pass forward and backward), cast back to ``x``'s dtype.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


def make_norm(cfg: ModelConfig, width: int) -> nn.Module:
    """The block/final norm of ``cfg.norm``: ``nn.LayerNorm`` or ``nn.RMSNorm`` (eps 1e-5)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=1e-5)
    return nn.LayerNorm(width, eps=1e-5)


class MLP(nn.Module):
    """The feed-forward layer on ``(B, T, D)``, hidden width ``h = cfg.mlp_hidden``.

    ``gelu``: ``fc2(Dropout(GELU(fc1(x))))`` with ``fc1: D -> h``.
    ``swiglu``: ``fc1: D -> 2h`` (gate and up projections in one matrix), then
    ``fc2(Dropout(SiLU(gate) * up))``. Biases follow ``cfg.bias``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, h = cfg.d_model, cfg.mlp_hidden
        self.swiglu = cfg.mlp == "swiglu"
        self.fc1 = nn.Linear(D, 2 * h if self.swiglu else h, bias=cfg.bias)
        self.act = nn.SiLU() if self.swiglu else nn.GELU()
        # ``nn.Dropout(0.0)`` still copies its input in training mode (a full (B, T, r D)
        # pass forward and backward), so with no dropout there is no module at all.
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(h, D, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(self.drop(self.act(gate) * up))
        return self.fc2(self.drop(self.act(self.fc1(x))))


@dataclass
class ForwardContext:
    """Per-forward information every block sees.

    ``n_tokens``: real input length ``N`` (before any LLP padding); ``offset``: global position
    of the first input token; ``seq_parallel``: LLP sequence-parallel object or None;
    ``cache``: a generation cache being filled (prefill) or None.
    """

    n_tokens: int
    offset: int = 0
    seq_parallel: Any = None
    cache: Any = None
    extra: dict = field(default_factory=dict)


class AttentionBase(nn.Module):
    """Projections of one attention layer (no bias on q/k/v; output projection with a bias
    when ``cfg.bias``).

    Options from ``ModelConfig``: ``shared_kv`` (one ``kv_proj``; the rotated, normed result is
    both keys and values, as in the reference), ``kv_layernorm`` (per-head LayerNorm of width
    ``d`` applied after RoPE), RoPE on/off for this layer (``rope_layers``), ``n_kv_heads``
    (keys/values have ``Hkv = cfg.kv_heads`` heads: ``(B, Hkv, T, d)``; grouped-query attention).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        D = cfg.d_model
        Dkv = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(D, D, bias=False)
        if cfg.shared_kv:
            self.kv_proj = nn.Linear(D, Dkv, bias=False)
        else:
            self.k_proj = nn.Linear(D, Dkv, bias=False)
            self.v_proj = nn.Linear(D, Dkv, bias=False)
        if cfg.kv_layernorm:
            self.kv_norm = nn.LayerNorm(self.head_dim)
            if not cfg.shared_kv:
                self.v_norm = nn.LayerNorm(self.head_dim)
        self.out_proj = nn.Linear(D, D, bias=cfg.bias)
        self.use_rope = cfg.uses_rope(layer)
        self.register_buffer(
            "inv_freq", rope_inv_freq(self.head_dim, cfg.rope_theta), persistent=False
        )
        self.dropout = cfg.dropout

    # ---- shapes -------------------------------------------------------------------------
    @staticmethod
    def merge_heads(t: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, d) -> (B, T, D)``; free when ``t``'s memory is ``(B, T, H, d)`` (what
        SDPA's CPU flash kernel returns), a copy otherwise."""
        B, H, T, d = t.shape
        return t.transpose(1, 2).reshape(B, T, H * d)

    def _rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``t`` ``(B, T, H, d)`` at ``positions`` ``(T,)`` (no-op without RoPE here)."""
        if not self.use_rope:
            return t
        rot = rope_rotations(self.inv_freq, positions).to(t.device).unsqueeze(1)
        return apply_rope(t, rot)

    # ---- projections --------------------------------------------------------------------
    def _heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``proj(x)`` for ``x`` ``(B, T, D)`` as ``(B, T, heads, d)`` (contiguous)."""
        B, T, _ = x.shape
        return proj(x).view(B, T, -1, self.head_dim)

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries ``(B, H, T, d)`` of normed inputs ``x`` ``(B, T, D)`` at ``positions`` ``(T,)``.

        The result is a transposed view of ``(B, T, H, d)`` memory, as SDPA takes it.
        """
        return self._rope(self._heads(self.q_proj, x), positions).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor):
        """Keys and values ``(B, Hkv, T, d)`` each (views of ``(B, T, Hkv, d)`` memory); with
        ``shared_kv`` they are the same tensor."""
        if self.cfg.shared_kv:
            k = self._rope(self._heads(self.kv_proj, x), positions)
            if self.cfg.kv_layernorm:
                k = self.kv_norm(k)
            k = k.transpose(1, 2)
            return k, k
        k = self._rope(self._heads(self.k_proj, x), positions)
        v = self._heads(self.v_proj, x)
        if self.cfg.kv_layernorm:
            k = self.kv_norm(k)
            v = self.v_norm(v)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q, k, v, mask: Optional[torch.Tensor] = None, causal: bool = False):
        """SDPA of ``q`` ``(B, H, Tq, d)`` over ``k, v`` ``(B, Hkv, Tk, d)`` with scale
        ``d**-0.5``; ``mask`` is boolean (True = visible), broadcastable. With ``Hkv < H`` SDPA's
        ``enable_gqa`` maps query head ``h`` to key/value head ``h // (H / Hkv)``.

        Attention-probability dropout ``cfg.dropout`` is applied only in training mode.
        """
        p = self.dropout if self.training else 0.0
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None,
            scale=self.head_dim ** -0.5, **gqa,
        )

    def residual(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The block's residual stream for this attention's output rows (identity by default)."""
        return x


def latent_mask(n_hist: int, n_lat: int, device=None) -> torch.Tensor:
    """Boolean mask ``(m, h + m)`` for latents: all ``h`` history keys visible, latents causal."""
    hist = torch.ones(n_lat, n_hist, dtype=torch.bool, device=device)
    lat = torch.ones(n_lat, n_lat, dtype=torch.bool, device=device).tril()
    return torch.cat([hist, lat], dim=1)
