"""LLP segment-pair attention: every query segment against ``[previous | own]`` keys.

arXiv:2412.06106 (LLP): with segments of ``L`` tokens, queries of segment ``s >= 1`` see all
``L`` keys of segment ``s - 1`` and the causal part of segment ``s``, i.e. the fixed ``(L, 2L)``
mask of ``pair_mask``; segment 0 (without a sequence-parallel halo) is causal within itself.

Two implementations; they agree up to float rounding (fp32 tests: forward identical,
gradients within ~1e-6; both are checked against a float64 dense reference):

- ``pair_attention_sdpa``: the public ``scaled_dot_product_attention`` on ``(B, H * S, L, 2L)``
  problems. The previous and own keys are concatenated, so keys and values are copied twice.
  Runs everywhere, with attention dropout too.
- ``pair_attention_cpu``: the same SDPA CPU flash kernel called directly on *overlapping
  strided windows* of the keys and values (window ``i`` covers segments ``i, i + 1`` of the
  unchanged ``(B, T, H, d)`` memory), with its own backward that folds each window's key/value
  gradient back onto the two segments it covers. No key/value copies without a halo (with
  one, each batch element's halo and keys are concatenated once), no N x N matrix.
  ``pair_attention`` picks it on CPU in fp32 without dropout (it also runs bf16, but there
  it was not faster than the public path on the benchmark machine, see ``docs/models.md``).
"""
from __future__ import annotations

import threading
import warnings
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
    ``v_prev`` may be None (shared keys/values: the halo keys are the values).
    Raises ``ValueError`` on shapes that break this contract (see ``check_inputs``, which
    the chosen path runs).
    """
    if _cpu_kernel_applies(q, k, v, dropout_p):
        return pair_attention_cpu(q, k, v, segment_len, scale, halo)
    return pair_attention_sdpa(q, k, v, segment_len, scale, halo, dropout_p)


def check_inputs(q, k, v, segment_len: int, halo=None):
    """Validate ``pair_attention``'s arguments; returns the halo with ``v_prev`` filled in.

    Raises ``ValueError`` unless ``q, k, v`` are ``(B, H, T, d)`` of one shape with
    ``T >= 1`` a multiple of ``segment_len >= 1``, and the halo (if any) is two
    ``(B, H, segment_len, d)`` tensors.
    """
    if not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"segment_len must be a positive int, got {segment_len!r}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (B, H, T, d) of one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}")
    T = q.shape[2]
    if T < 1 or T % segment_len != 0:
        raise ValueError(
            f"LLP attention length {T} is not a positive multiple of segment_len {segment_len}")
    if halo is None:
        return None
    k_prev, v_prev = halo
    if v_prev is None:
        v_prev = k_prev
    want = (q.shape[0], q.shape[1], segment_len, q.shape[3])
    if tuple(k_prev.shape) != want or tuple(v_prev.shape) != want:
        raise ValueError(
            f"halo keys/values must be (B, H, segment_len, d) = {want}, got "
            f"{tuple(k_prev.shape)} and {tuple(v_prev.shape)}")
    return k_prev, v_prev


def _cpu_kernel_applies(q, k, v, dropout_p: float) -> bool:
    # fp32 only: in bf16 (autocast) the kernel path measured 1.00-1.04x the public path's
    # LLP step time (N = 4k, 16k), against 0.92-0.95x in fp32 (N = 2k, 16k; docs/models.md)
    return (dropout_p == 0.0 and q.device.type == "cpu" and q.dtype == torch.float32
            and k.dtype == q.dtype and v.dtype == q.dtype and _cpu_kernel_works())


_PROBE: dict = {}
_PROBE_LOCK = threading.Lock()


def _cpu_kernel_works() -> bool:
    """Whether this torch's CPU flash kernel takes what ``pair_attention_cpu`` passes it (a
    float mask, overlapping strided windows, strided gradients) and reads them as it would
    read contiguous copies; checked once per process on a tiny problem, so a torch whose
    private kernel differs falls back to the public path (with a warning).

    The check calls the kernel's forward and backward directly, without autograd: it runs
    inside the first LLP forward, which may be under ``no_grad``, ``inference_mode``,
    autocast or an activation-checkpointing region that counts every saved tensor.
    """
    if "ok" not in _PROBE:
        with _PROBE_LOCK:
            if "ok" not in _PROBE:
                ok = _FLASH_CPU is not None and _FLASH_CPU_BWD is not None
                if ok:
                    why = "it reads strided windows differently from contiguous copies"
                    try:
                        with torch.no_grad(), torch.autocast("cpu", enabled=False):
                            ok = _probe()
                    except Exception as e:  # any failure means: do not use this kernel
                        why, ok = f"{type(e).__name__}: {e}", False
                    if not ok:
                        warnings.warn(
                            f"LLP pair attention: torch {torch.__version__}'s CPU flash kernel "
                            f"cannot run the strided-window path ({why}); using the slower "
                            "public-SDPA path", RuntimeWarning)
                _PROBE["ok"] = ok
    return _PROBE["ok"]


def _probe() -> bool:
    """Windowed kernel calls (forward, backward) against the same calls on contiguous
    copies; True when they agree."""
    g = torch.Generator().manual_seed(0)
    L, n, H, d = 2, 3, 2, 4
    q, k, v = (torch.randn((n + 1) * L, H, d, generator=g, dtype=torch.float32)
               for _ in range(3))
    f, r, kr = _query_parts(L)[0]
    mask = _part_mask(L, f, r, kr, torch.float32)
    windowed = (_rows(q, n, L + f, r, L), _rows(k, n, 0, kr, L), _rows(v, n, 0, kr, L))
    dense = tuple(t.contiguous() for t in windowed)
    results = []
    for qq, kk, vv in (windowed, dense):
        o, lse = _FLASH_CPU(qq, kk, vv, 0.0, False, attn_mask=mask, scale=0.5)
        go = torch.ones_like(o).transpose(1, 2).contiguous().transpose(1, 2)  # strided grad
        grads = _FLASH_CPU_BWD(go, qq, kk, vv, o, lse, 0.0, False, attn_mask=mask, scale=0.5)
        results.append((o, *grads))
    return all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))


# ---- the public-SDPA path ------------------------------------------------------------------
def pair_attention_sdpa(q, k, v, segment_len: int, scale: float, halo=None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """``pair_attention`` with ``F.scaled_dot_product_attention`` on concatenated pairs."""
    halo = check_inputs(q, k, v, segment_len, halo)
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


def _rows(t: torch.Tensor, n: int, first: int, rows: int, L: int) -> torch.Tensor:
    """``n`` row blocks of ``t`` ``(T', H, d)`` (contiguous), block ``i`` = rows
    ``[iL + first, iL + first + rows)``; a ``(n, H, rows, d)`` view (blocks overlap when
    ``rows > L``, which the flash kernel reads as it is)."""
    _, H, d = t.shape
    return t.as_strided((n, rows, H, d), (L * H * d, H * d, d, 1),
                        t.storage_offset() + first * H * d).transpose(1, 2)


def _query_parts(L: int):
    """Split each query segment into parts ``(first_row, rows, key_rows)``: the rows
    ``[first, first + rows)`` of segment ``s`` see the ``L`` keys of segment ``s - 1`` and the
    first ``first + rows`` keys of segment ``s``, so the window need only be ``L + first + rows``
    keys wide. Two halves skip a quarter of the masked (causal) triangle the flash kernel would
    otherwise compute: 11-15% less kernel time at ``L = 256`` on CPU, measured on the kernel
    calls (4 or 8 parts measured slower: per-call overhead outweighs the saving)."""
    h = L // 2
    if h == 0:
        return [(0, L, 2 * L)]
    return [(0, h, L + h), (h, L - h, 2 * L)]


def _part_mask(L: int, first: int, rows: int, key_rows: int, dtype) -> torch.Tensor:
    """Additive ``(rows, key_rows)`` mask of one query part: own-segment keys causal."""
    r = torch.arange(first, first + rows)[:, None]
    j = torch.arange(key_rows)[None, :]
    return torch.zeros(rows, key_rows, dtype=dtype).masked_fill_(j > L + r, float("-inf"))


def _ext(t: torch.Tensor, prev, b: int) -> torch.Tensor:
    """Keys (or values) of batch element ``b`` that the windows run over: ``(T', H, d)``."""
    return t[b] if prev is None else torch.cat([prev[b], t[b]])


class _PairAttentionCPU(torch.autograd.Function):
    """Forward and backward of ``pair_attention_cpu``; tensors are contiguous ``(B, T, H, d)``.

    ``ext`` is the keys (no halo: windows ``i = 0 .. S-2`` serve query segments ``1 .. S-1``)
    or the halo followed by the keys (windows ``i = 0 .. S-1`` serve segments ``0 .. S-1``).
    Per batch element and query part one flash call covers every window; without a halo one
    more call, batched over ``B``, runs segment 0 causally. The backward calls the flash
    backward with each call's own output and log-sum-exp, and adds each window's key/value
    gradients onto the two segments the window overlaps.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_prev, v_prev, L: int, scale: float):
        B, T, H, d = q.shape
        S = T // L
        n = S if k_prev is not None else S - 1
        parts = _query_parts(L)
        masks = [_part_mask(L, f, r, kr, q.dtype) for f, r, kr in parts]
        out = torch.empty_like(q)
        lses = []
        for b in range(B if n else 0):
            kx, vx = _ext(k, k_prev, b), _ext(v, v_prev, b)
            for (f, r, kr), mask in zip(parts, masks):
                first = (S - n) * L + f
                o, lse = _FLASH_CPU(_rows(q[b], n, first, r, L), _rows(kx, n, 0, kr, L),
                                    _rows(vx, n, 0, kr, L), 0.0, False, attn_mask=mask,
                                    scale=scale)
                _rows(out[b], n, first, r, L).copy_(o)
                lses.append(lse)
        lse0 = None
        if k_prev is None:
            o0, lse0 = _FLASH_CPU(q[:, :L].transpose(1, 2), k[:, :L].transpose(1, 2),
                                  v[:, :L].transpose(1, 2), 0.0, True, scale=scale)
            out[:, :L].copy_(o0.transpose(1, 2))
        ctx.save_for_backward(q, k, v, k_prev, v_prev, out, lse0, *masks, *lses)
        ctx.L, ctx.scale, ctx.n_parts = L, scale, len(parts)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, k_prev, v_prev, out, lse0, *rest = ctx.saved_tensors
        L, scale, n_parts = ctx.L, ctx.scale, ctx.n_parts
        masks, lses = rest[:n_parts], rest[n_parts:]
        B, T, H, d = q.shape
        S = T // L
        halo = k_prev is not None
        n = S if halo else S - 1
        parts = _query_parts(L)
        g = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk_prev = torch.empty_like(k_prev) if halo else None
        dv_prev = torch.empty_like(v_prev) if halo else None
        if n == 0:  # one segment, no halo: only the causal call below writes
            dk.zero_()
            dv.zero_()
        for b in range(B if n else 0):
            kx, vx = _ext(k, k_prev, b), _ext(v, v_prev, b)
            # gradients of the ext rows; window i adds to ext segments i and i + 1
            dkx = torch.empty_like(kx) if halo else dk[b]
            dvx = torch.empty_like(vx) if halo else dv[b]
            for j, ((f, r, kr), mask) in enumerate(zip(parts, masks)):
                first = (S - n) * L + f
                dqw, dkw, dvw = _FLASH_CPU_BWD(
                    _rows(g[b], n, first, r, L), _rows(q[b], n, first, r, L),
                    _rows(kx, n, 0, kr, L), _rows(vx, n, 0, kr, L),
                    _rows(out[b], n, first, r, L), lses[b * n_parts + j], 0.0, False,
                    attn_mask=mask, scale=scale)
                _rows(dq[b], n, first, r, L).copy_(dqw)
                for dw, dx in ((dkw, dkx), (dvw, dvx)):
                    left = _rows(dx, n, 0, L, L)
                    if j == 0:  # the first part's left halves cover ext segments 0 .. n-1
                        left.copy_(dw[:, :, :L])
                        dx[n * L:].zero_()
                    else:
                        left += dw[:, :, :L]
                    _rows(dx, n, L, kr - L, L).add_(dw[:, :, L:])
            if halo:
                dk_prev[b], dk[b] = dkx[:L], dkx[L:]
                dv_prev[b], dv[b] = dvx[:L], dvx[L:]
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
    halo = check_inputs(q, k, v, segment_len, halo)
    k_prev, v_prev = (None, None) if halo is None else halo
    out = _PairAttentionCPU.apply(
        _bthd(q), _bthd(k), _bthd(v),
        None if k_prev is None else _bthd(k_prev), None if v_prev is None else _bthd(v_prev),
        segment_len, scale)
    return out.transpose(1, 2)
