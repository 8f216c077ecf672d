"""LLP segment-pair attention: every query segment against ``[previous | own]`` keys.

arXiv:2412.06106 (LLP): with segments of ``L`` tokens, queries of segment ``s >= 1`` see all
``L`` keys of segment ``s - 1`` and the causal part of segment ``s``, i.e. the fixed ``(L, 2L)``
mask of ``pair_mask``; segment 0 (without a sequence-parallel halo) is causal within itself.

Two implementations with identical results:

- ``pair_attention_sdpa``: the public ``scaled_dot_product_attention`` on ``(B, H * S, L, 2L)``
  problems. The previous and own keys are concatenated, so keys and values are copied twice.
  Runs everywhere, with attention dropout too.
- ``pair_attention_cpu``: the same SDPA CPU flash kernel called directly on *overlapping
  strided windows* of the keys and values (window ``i`` covers segments ``i, i + 1`` of the
  unchanged ``(B, T, H, d)`` memory), with its own backward that folds each window's key/value
  gradient back onto the two segments it covers. No key/value copies, no N x N matrix.
  Used on CPU in fp32/bf16 without dropout (``pair_attention`` picks it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)


def pair_mask(L: int, device=None) -> torch.Tensor:
    """Boolean ``(L, 2L)`` mask of one segment pair: left half visible, right half causal."""
    left = torch.ones(L, L, dtype=torch.bool, device=device)
    right = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return torch.cat([left, right], dim=1)


def pair_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_len: int,
                   scale: float, halo: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """LLP attention of ``q, k, v`` ``(B, H, T, d)`` (``T = S * L``) -> ``(B, H, T, d)``.

    ``halo``: ``(k_prev, v_prev)`` ``(B, H, L, d)`` of the segment before this chunk (sequence
    parallelism); then segment 0 pairs with it like any other segment. ``v`` may be ``k``
    (shared keys/values). Picks ``pair_attention_cpu`` where it applies, else the SDPA path.
    Raises ``ValueError`` when ``T`` is not a multiple of ``segment_len``.
    """
    if q.shape[2] % segment_len != 0:
        raise ValueError(
            f"LLP attention length {q.shape[2]} is not a multiple of segment_len {segment_len}")
    if _cpu_kernel_applies(q, k, v, dropout_p):
        return pair_attention_cpu(q, k, v, segment_len, scale, halo)
    return pair_attention_sdpa(q, k, v, segment_len, scale, halo, dropout_p)


def _cpu_kernel_applies(q, k, v, dropout_p: float) -> bool:
    return (_FLASH_CPU is not None and _FLASH_CPU_BWD is not None and dropout_p == 0.0
            and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and k.dtype == q.dtype and v.dtype == q.dtype)


# ---- the public-SDPA path ------------------------------------------------------------------
def pair_attention_sdpa(q, k, v, segment_len: int, scale: float, halo=None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """``pair_attention`` with ``F.scaled_dot_product_attention`` on concatenated pairs."""
    B, H, T, d = q.shape
    L = segment_len
    S = T // L
    shared = v is k
    qs, ks = q.reshape(B, H, S, L, d), k.reshape(B, H, S, L, d)
    vs = ks if shared else v.reshape(B, H, S, L, d)

    def sdpa(qq, kk, vv, **kw):
        return F.scaled_dot_product_attention(qq, kk, vv, dropout_p=dropout_p, scale=scale, **kw)

    def pairs(qq, kc, vc, kp, vp):
        Sp = qq.shape[2]
        kk = torch.cat([kp, kc], dim=3)
        vv = kk if (vp is kp and vc is kc) else torch.cat([vp, vc], dim=3)
        o = sdpa(qq.reshape(B, H * Sp, L, d), kk.reshape(B, H * Sp, 2 * L, d),
                 vv.reshape(B, H * Sp, 2 * L, d), attn_mask=pair_mask(L, q.device))
        return o.view(B, H, Sp, L, d)

    if halo is None:
        o0 = sdpa(qs[:, :, 0], ks[:, :, 0], vs[:, :, 0], is_causal=True).unsqueeze(2)
        if S == 1:
            return o0.reshape(B, H, T, d)
        kp = ks[:, :, :-1]
        vp = kp if shared else vs[:, :, :-1]
        kc = ks[:, :, 1:]
        vc = kc if shared else vs[:, :, 1:]
        return torch.cat([o0, pairs(qs[:, :, 1:], kc, vc, kp, vp)], dim=2).reshape(B, H, T, d)
    k_prev, v_prev = halo
    kp = torch.cat([k_prev.unsqueeze(2), ks[:, :, :-1]], dim=2)
    vp = kp if (shared and v_prev is k_prev) else torch.cat(
        [v_prev.unsqueeze(2), vs[:, :, :-1]], dim=2)
    return pairs(qs, ks, vs, kp, vp).reshape(B, H, T, d)


# ---- the CPU flash-kernel path -------------------------------------------------------------
def _bthd(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, d)`` -> contiguous ``(B, T, H, d)`` (free for SDPA-style transposed views)."""
    return t.transpose(1, 2).contiguous()


def _windows(ext: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """``n`` overlapping windows of ``2L`` rows, window ``i`` = rows ``[iL, (i + 2)L)`` of
    ``ext`` ``(T', H, d)`` (contiguous); returned as ``(n, H, 2L, d)`` without copying."""
    _, H, d = ext.shape
    return ext.as_strided((n, 2 * L, H, d), (L * H * d, H * d, d, 1),
                          ext.storage_offset()).transpose(1, 2)


def _segments(t: torch.Tensor, L: int) -> torch.Tensor:
    """``(T, H, d)`` contiguous -> ``(T / L, H, L, d)`` view."""
    _, H, d = t.shape
    return t.view(-1, L, H, d).transpose(1, 2)


class _PairAttentionCPU(torch.autograd.Function):
    """Forward and backward of ``pair_attention_cpu``; tensors are contiguous ``(B, T, H, d)``.

    Per batch element one flash call covers all pairs (queries of ext segment ``i + 1``
    against the window over ext segments ``i, i + 1``; ``ext`` is the keys, or the halo
    followed by the keys); without a halo one more call, batched over ``B``, runs segment 0
    causally. The backward calls the flash backward with each call's own output and
    log-sum-exp and adds window gradients onto the segments they overlap.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_prev, v_prev, L: int, scale: float):
        B, T, H, d = q.shape
        S = T // L
        halo = k_prev is not None
        mask = torch.zeros(L, 2 * L, dtype=q.dtype).masked_fill_(~pair_mask(L), float("-inf"))
        out = torch.empty_like(q)
        lses = []
        for b in range(B):
            kx, vx = (torch.cat([k_prev[b], k[b]]), torch.cat([v_prev[b], v[b]])) if halo \
                else (k[b], v[b])
            n = S if halo else S - 1
            if n == 0:
                lses.append(None)
                continue
            qw = _segments(q[b], L)[S - n:]
            o, lse = _FLASH_CPU(qw, _windows(kx, n, L), _windows(vx, n, L), 0.0, False,
                                attn_mask=mask, scale=scale)
            _segments(out[b], L)[S - n:].copy_(o)
            lses.append(lse)
        lse0 = None
        if not halo:
            o0, lse0 = _FLASH_CPU(q[:, :L].transpose(1, 2), k[:, :L].transpose(1, 2),
                                  v[:, :L].transpose(1, 2), 0.0, True, scale=scale)
            out[:, :L].copy_(o0.transpose(1, 2))
        ctx.save_for_backward(q, k, v, k_prev, v_prev, out, mask, lse0, *lses)
        ctx.L, ctx.scale, ctx.B = L, scale, B
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, k_prev, v_prev, out, mask, lse0, *lses = ctx.saved_tensors
        L, scale, B = ctx.L, ctx.scale, ctx.B
        T, H, d = q.shape[1:]
        S = T // L
        halo = k_prev is not None
        g = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dk_prev = torch.zeros_like(k_prev) if halo else None
        dv_prev = torch.zeros_like(v_prev) if halo else None
        for b in range(B):
            n = S if halo else S - 1
            if n == 0:
                continue
            kx, vx = (torch.cat([k_prev[b], k[b]]), torch.cat([v_prev[b], v[b]])) if halo \
                else (k[b], v[b])
            seg = slice(S - n, S)
            dqw, dkw, dvw = _FLASH_CPU_BWD(
                _segments(g[b], L)[seg], _segments(q[b], L)[seg], _windows(kx, n, L),
                _windows(vx, n, L), _segments(out[b], L)[seg], lses[b], 0.0, False,
                attn_mask=mask, scale=scale)
            _segments(dq[b], L)[seg].copy_(dqw)
            for dw, dst, dst_prev in ((dkw, dk[b], dk_prev), (dvw, dv[b], dv_prev)):
                # window i covers ext segments i (left half) and i + 1 (right half)
                dext = torch.zeros((n + 1) * L, H, d, dtype=dst.dtype) if halo else dst
                ds = _segments(dext, L)
                ds[:n] += dw[:, :, :L]
                ds[1:n + 1] += dw[:, :, L:]
                if halo:
                    dst_prev[b].copy_(dext[:L])
                    dst.copy_(dext[L:])
        if not halo:
            dq0, dk0, dv0 = _FLASH_CPU_BWD(
                g[:, :L].transpose(1, 2), q[:, :L].transpose(1, 2), k[:, :L].transpose(1, 2),
                v[:, :L].transpose(1, 2), out[:, :L].transpose(1, 2), lse0, 0.0, True,
                scale=scale)
            dq[:, :L].copy_(dq0.transpose(1, 2))
            dk[:, :L] += dk0.transpose(1, 2)
            dv[:, :L] += dv0.transpose(1, 2)
        return dq, dk, dv, dk_prev, dv_prev, None, None


def pair_attention_cpu(q, k, v, segment_len: int, scale: float, halo=None) -> torch.Tensor:
    """``pair_attention`` via SDPA's CPU flash kernel on overlapping key/value windows.

    Shapes as ``pair_attention``; returns a ``(B, H, T, d)`` view of ``(B, T, H, d)`` memory.
    No dropout. With shared keys/values (``v is k``) autograd adds the two gradients.
    """
    k_prev, v_prev = (None, None) if halo is None else halo
    if k_prev is not None and v_prev is None:
        v_prev = k_prev
    out = _PairAttentionCPU.apply(
        _bthd(q), _bthd(k), _bthd(v),
        None if k_prev is None else _bthd(k_prev), None if v_prev is None else _bthd(v_prev),
        segment_len, scale)
    return out.transpose(1, 2)
