"""LLP segment-pair attention: every query segment against ``[previous | own]`` keys.

arXiv:2412.06106 (LLP): with segments of ``L`` tokens, queries of segment ``s >= 1`` see all
``L`` keys of segment ``s - 1`` and the causal part of segment ``s``, i.e. the ``(L, 2L)`` mask of
``pair_mask``; segment 0 (without a sequence-parallel halo) is causal within itself.

That pair mask is exactly the *bottom-right aligned* causal mask of an ``(L, 2L)`` problem
(query ``r`` sees keys ``<= L + r``), so one public kernel path serves every device:
``torch.nn.functional.scaled_dot_product_attention`` on ``(B * S, H, L, 2L)`` problems with
``attn_mask=torch.nn.attention.bias.causal_lower_right(L, 2L)``. On CUDA that bias dispatches to
FlashAttention's (or the memory-efficient kernel's) bottom-right causal mode without a mask
tensor; elsewhere torch materializes the boolean mask and runs the best SDPA kernel for it (the
CPU flash kernel on CPU). Attention dropout is passed through on every path. Segment 0 without
a halo is an ``is_causal=True`` call. Which backend each device uses: ``docs/models.md``.

Grouped-query attention (``n_kv_heads < n_heads``): keys/values ``(B, Hkv, T, d)`` with ``Hkv``
dividing ``H``; query head ``h`` uses key/value head ``h // (H / Hkv)``. The pair keys/values
are a copy anyway (previous and own segment concatenated); they are built with the heads
repeated, so every backend sees plain multi-head inputs.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def pair_mask(L: int, device=None) -> torch.Tensor:
    """Boolean ``(L, 2L)`` mask of one segment pair: left half visible, right half causal
    (what ``causal_lower_right(L, 2L)`` denotes; used by tests and documentation)."""
    left = torch.ones(L, L, dtype=torch.bool, device=device)
    right = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return torch.cat([left, right], dim=1)


@functools.lru_cache(maxsize=None)
def pair_bias(L: int):
    """``causal_lower_right(L, 2L)``, built once per ``L`` and reused: the bias is a tensor
    subclass that cannot be constructed under an active dispatch mode (e.g.
    ``torch.utils.flop_counter.FlopCounterMode``), so ``LLPAttention`` builds it at model
    construction."""
    return causal_lower_right(L, 2 * L)


def check_inputs(q, k, v, segment_len: int, halo=None):
    """Validate ``pair_attention``'s arguments; returns the halo with ``v_prev`` filled in.

    Raises ``ValueError`` unless ``q`` is ``(B, H, T, d)`` and ``k, v`` are ``(B, Hkv, T, d)``
    with ``Hkv`` dividing ``H``, ``T >= 1`` a multiple of ``segment_len >= 1``, and the halo
    (if any) is two ``(B, Hkv, segment_len, d)`` tensors.
    """
    if not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"segment_len must be a positive int, got {segment_len!r}")
    if (q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]
            or k.shape[2:] != q.shape[2:] or q.shape[1] % max(k.shape[1], 1) != 0):
        raise ValueError(
            f"q must be (B, H, T, d) and k, v (B, Hkv, T, d) of one shape with Hkv dividing H, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    T = q.shape[2]
    if T < 1 or T % segment_len != 0:
        raise ValueError(
            f"LLP attention length {T} is not a positive multiple of segment_len {segment_len}")
    if halo is None:
        return None
    k_prev, v_prev = halo
    if v_prev is None:
        v_prev = k_prev
    want = (k.shape[0], k.shape[1], segment_len, k.shape[3])
    if tuple(k_prev.shape) != want or tuple(v_prev.shape) != want:
        raise ValueError(
            f"halo keys/values must be (B, Hkv, segment_len, d) = {want}, got "
            f"{tuple(k_prev.shape)} and {tuple(v_prev.shape)}")
    return k_prev, v_prev


def _segments(t: torch.Tensor, L: int) -> torch.Tensor:
    """``(B, H, S*L, d)`` -> ``(B, S, H, L, d)`` (a view for SDPA-style layouts)."""
    return t.unflatten(2, (t.shape[2] // L, L)).transpose(1, 2)


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, Hkv, T, d)`` -> ``(B, Hkv * groups, T, d)``, head ``j`` repeated ``groups`` times
    consecutively (no copy when ``groups == 1``)."""
    if groups == 1:
        return t
    B, Hk, T, d = t.shape
    return t.unsqueeze(2).expand(B, Hk, groups, T, d).reshape(B, Hk * groups, T, d)


def _pairs(prev: torch.Tensor, own: torch.Tensor, groups: int) -> torch.Tensor:
    """Keys (or values) of each pair: ``prev, own`` ``(B, S', Hkv, L, d)`` ->
    ``(B * S', Hkv * groups, 2L, d)``, previous segment first, heads repeated ``groups`` times
    (each key/value head serves ``groups`` consecutive query heads)."""
    pair = torch.cat([prev, own], dim=3)
    B, Sp, Hk, L2, d = pair.shape
    if groups > 1:
        pair = pair.unsqueeze(3).expand(B, Sp, Hk, groups, L2, d)
    return pair.reshape(B * Sp, Hk * groups, L2, d)


def pair_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_len: int,
                   scale: float, halo: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """LLP attention of ``q`` ``(B, H, T, d)`` over ``k, v`` ``(B, Hkv, T, d)`` -> ``(B, H, T, d)``.

    ``T = S * L`` with ``L = segment_len``; ``Hkv`` divides ``H`` (grouped-query attention when
    smaller). ``halo``: ``(k_prev, v_prev)`` ``(B, Hkv, L, d)`` of the segment before this chunk
    (sequence parallelism); then segment 0 pairs with it like any other segment. ``v`` may be
    ``k`` (shared keys/values); ``v_prev`` may be None (the halo keys are the values).
    ``scale`` multiplies ``q k^T``; ``dropout_p`` is SDPA's attention-probability dropout (pass
    0 outside training). Raises ``ValueError`` on shapes that break this contract
    (``check_inputs``).
    """
    halo = check_inputs(q, k, v, segment_len, halo)
    B, H, T, d = q.shape
    L = segment_len
    S = T // L
    G = H // k.shape[1]
    shared = v is k and (halo is None or halo[1] is halo[0])
    qs, ks = _segments(q, L), _segments(k, L)
    vs = ks if v is k else _segments(v, L)

    def sdpa(qq, kk, vv, **kw):
        return F.scaled_dot_product_attention(qq, kk, vv, dropout_p=dropout_p, scale=scale, **kw)

    def attend_pairs(qq, kp, kc, vp, vc):
        """``qq`` ``(B, S', H, L, d)`` against pairs ``[prev | own]`` -> ``(B, S', L, H, d)``."""
        Sp = qq.shape[1]
        kk = _pairs(kp, kc, G)
        vv = kk if shared else _pairs(vp, vc, G)
        o = sdpa(qq.reshape(B * Sp, H, L, d), kk, vv, attn_mask=pair_bias(L))
        return o.view(B, Sp, H, L, d).transpose(2, 3)

    if halo is None:
        k0 = _repeat_heads(ks[:, 0], G)
        v0 = k0 if v is k else _repeat_heads(vs[:, 0], G)
        o0 = sdpa(qs[:, 0], k0, v0, is_causal=True).transpose(1, 2).unsqueeze(1)
        if S == 1:
            out = o0
        else:
            o = attend_pairs(qs[:, 1:], ks[:, :-1], ks[:, 1:], vs[:, :-1], vs[:, 1:])
            out = torch.cat([o0, o], dim=1)
    else:
        k_prev, v_prev = halo
        kp = torch.cat([k_prev.unsqueeze(1), ks[:, :-1]], dim=1)
        vp = kp if shared else torch.cat([v_prev.unsqueeze(1), vs[:, :-1]], dim=1)
        out = attend_pairs(qs, kp, ks, vp, vs)
    # (B, S, L, H, d) -> (B, H, T, d); a view of (B, T, H, d) memory after the concatenation,
    # so merging the heads afterwards is free
    return out.reshape(B, T, H, d).transpose(1, 2)
