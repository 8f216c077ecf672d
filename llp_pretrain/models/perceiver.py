"""The PerceiverAR family: ``perceiver_ar`` and its three enhancements.

The window of ``N`` tokens is a history (first ``h = N - m``) and ``m = latent_len`` latents.
Latent queries at global position ``h + i`` see every history key plus latents ``h .. h + i``
(mask from ``layers.latent_mask``). The variants differ in what the history does
(arXiv:2412.06106, sections on PerceiverAR and the three enhancements; reference classes
``PerceiverARAttention``, ``DoubleAttention``, ``CompressedDoubleAttention``, ``sSplitAttention``):

- ``perceiver_ar``: layer 0 is cross-attention (latent queries over all ``N`` keys) and the block
  keeps only the latent rows; later layers are causal self-attention among the ``m`` latents.
- ``history_self_attention``: all ``N`` rows kept; history queries attend to history keys
  (bidirectional, no loss is taken there), latents as above, in every layer.
- ``segmented_history``: as ``history_self_attention`` but each of ``k`` history segments
  attends only within itself.
- ``compressed_history``: layer 0 as ``history_self_attention``, then the heads-merged history
  output ``(B, h, D)`` is compressed along the sequence by ``Linear(h, c)`` before the output
  projection; later layers run on ``c + m`` rows.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import AttentionBase, ForwardContext, latent_mask


def _split(ctx: ForwardContext, cfg):
    """``(h, m)`` for an input of ``ctx.n_tokens`` tokens."""
    N = ctx.n_tokens
    m = min(cfg.latent_len, N)
    return N - m, m


class PerceiverARAttention(AttentionBase):
    """Variant ``perceiver_ar``: layer 0 ``(B, N, D) -> (B, m, D)``, later ``(B, m, D)``."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, m = _split(ctx, self.cfg)
        dev = x.device
        if self.layer == 0:
            pos = torch.arange(h + m, device=dev)
            q = self.queries(x[:, h:], pos[h:])
            k, v = self.keys_values(x, pos)
            o = self.attend(q, k, v, mask=latent_mask(h, m, dev))
        else:
            pos = torch.arange(h, h + m, device=dev)
            q = self.queries(x, pos)
            k, v = self.keys_values(x, pos)
            o = self.attend(q, k, v, causal=True)
        return self.out_proj(self.merge_heads(o))

    def residual(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.layer == 0:
            h, _ = _split(ctx, self.cfg)
            return x[:, h:]
        return x


class HistorySelfAttention(AttentionBase):
    """Variant ``history_self_attention`` (reference ``DoubleAttention``): ``(B, N, D)`` in and out.

    Subclasses change ``history_attention`` (segmented) or the history length per layer.
    """

    def _layout(self, ctx: ForwardContext):
        """``(n_hist_rows, n_latents, positions of the rows)`` of this layer's input."""
        h, m = _split(ctx, self.cfg)
        return h, m, torch.arange(h + m)

    def history_attention(self, q, k, v):
        """History queries ``(B, H, h, d)`` over history keys, no mask."""
        return self.attend(q, k, v)

    def mixed(self, x: torch.Tensor, ctx: ForwardContext):
        """Heads-merged attention output of history rows ``(B, hr, D)`` and latents ``(B, m, D)``."""
        hr, m, pos = self._layout(ctx)
        pos = pos.to(x.device)
        q = self.queries(x, pos)
        k, v = self.keys_values(x, pos)
        o_lat = self.attend(q[:, :, hr:], k, v, mask=latent_mask(hr, m, x.device))
        if hr == 0:
            return None, self.merge_heads(o_lat)
        o_hist = self.history_attention(q[:, :, :hr], k[:, :, :hr], v[:, :, :hr])
        return self.merge_heads(o_hist), self.merge_heads(o_lat)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hist, lat = self.mixed(x, ctx)
        out = lat if hist is None else torch.cat([hist, lat], dim=1)
        return self.out_proj(out)


class SegmentedHistoryAttention(HistorySelfAttention):
    """Variant ``segmented_history`` (reference ``sSplitAttention``): ``k`` history segments,
    each bidirectional within itself."""

    def history_attention(self, q, k, v):
        B, H, h, d = q.shape
        kseg = self.cfg.history_segments
        if h % kseg != 0:
            raise ValueError(
                f"history length {h} is not a multiple of history_segments {kseg}"
            )
        c = h // kseg

        def seg(t):
            # (B, heads, h, d) -> (B * kseg, heads, c, d): segments join the batch, heads stay
            # a separate axis so grouped-query heads map as in every other attention
            return t.unflatten(2, (kseg, c)).transpose(1, 2).reshape(B * kseg, t.shape[1], c, d)

        o = self.attend(seg(q), seg(k), seg(v))
        return o.view(B, kseg, H, c, d).transpose(1, 2).reshape(B, H, h, d)


class CompressedHistoryAttention(HistorySelfAttention):
    """Variant ``compressed_history`` (reference ``CompressedDoubleAttention``).

    Layer 0: ``(B, N, D) -> (B, c + m, D)``; the history output is compressed by ``hist_proj``
    (``Linear(h, c)`` along the sequence axis). Later layers: ``(B, c + m, D)``; with RoPE there
    (``rope_layers='all'``) the compressed rows take positions ``h - c .. h - 1``.
    Residual of layer 0: ``compressed_history_residual='compress'`` (default) compresses the
    history inputs with the same ``hist_proj`` and keeps the latent inputs for the latents;
    ``'truncate'`` reproduces the reference, which adds ``x[:, :c + m]`` (misaligned when
    ``c != h``).
    """

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        if layer == 0:
            h = cfg.seq_len - cfg.latent_len
            self.hist_proj = nn.Linear(h, cfg.compression_len, bias=cfg.bias)

    def _layout(self, ctx: ForwardContext):
        h, m = _split(ctx, self.cfg)
        if self.layer == 0:
            return h, m, torch.arange(h + m)
        c = self.cfg.compression_len
        return c, m, torch.arange(h - c, h + m)

    def _compress(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, h, D) -> (B, c, D)`` by ``hist_proj`` along the sequence axis."""
        return self.hist_proj(t.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.n_tokens != self.cfg.seq_len:
            raise ValueError(
                f"compressed_history needs inputs of exactly seq_len={self.cfg.seq_len} tokens, "
                f"got {ctx.n_tokens}"
            )
        hist, lat = self.mixed(x, ctx)
        if self.layer == 0:
            hist = self._compress(hist)
        return self.out_proj(torch.cat([hist, lat], dim=1))

    def residual(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.layer != 0:
            return x
        h, m = _split(ctx, self.cfg)
        c = self.cfg.compression_len
        if self.cfg.compressed_history_residual == "truncate":
            return x[:, :c + m]
        return torch.cat([self._compress(x[:, :h]), x[:, h:]], dim=1)
