"""The one-segment halo exchange of sequence-parallel LLP (forward and backward).

LLP attention (arXiv:2412.06106, ``ARCHITECTURES.md`` section 6) lets segment ``s`` attend to
segment ``s - 1`` and itself only. When a sequence of ``N`` tokens is split over ``P`` ranks in
contiguous chunks of whole segments, rank ``r`` needs, per layer, only the keys/values of the
last segment of rank ``r - 1``: the halo.

* forward: rank ``r`` sends its last segment's ``k, v`` ``(B, H, L, d)`` to ``r + 1`` and
  receives those of ``r - 1`` (rank 0 only sends, rank ``P - 1`` only receives), with one
  ``torch.distributed.batch_isend_irecv`` of ``P2POp`` s on the sequence-parallel group.
* backward: the gradient w.r.t. the received halo goes back to ``r - 1``, which adds it to the
  gradient of its own last-segment ``k, v`` (``_HaloExchangeFn.backward``).

Elements moved per layer per rank and direction: ``2 * B * L * Hkv * d`` (half that with shared
K/V), ``Hkv`` the key/value heads (``n_kv_heads``; ``Hkv * d = D`` without grouped-query
attention, ``D * Hkv / H`` with it).

Making backward run on every rank. The model keeps using its own ``k_last`` and only consumes
the *returned* halo, so on the group's first rank (which receives nothing) no output of the
exchange would lie on the loss path and its backward (the receive of the gradient from rank 1)
would never run. Each exchange therefore also returns a zero scalar *anchor*;
:meth:`SequenceParallelContext.halo_loss_term` sums them and the loss adds that sum (value 0),
so every exchange's backward runs exactly once per backward pass on every rank.

Activation checkpointing. Non-reentrant checkpointing (``torch.utils.checkpoint``,
``use_reentrant=False``) re-runs a block's forward inside backward to rebuild saved tensors. A
re-run exchange must not communicate: the first rank may already be blocked receiving a
gradient while its successor waits for a forward halo, a deadlock. So an exchange called while
the backward of this context's loss has begun is a *replay*: it returns the halo cached by the
original forward call whose sent keys/values equal the re-computed ones (checked, most recent
first), without any communication. The context learns that the backward has begun from a small
autograd function on the loss itself (:meth:`SequenceParallelContext.add_halo_terms`): every
node of the model lies upstream of the loss, so its backward runs before any block is
re-computed (public autograd only; no engine internals). The loss must therefore go through
``add_halo_terms``. Reentrant checkpointing (forward under ``no_grad``, backward of the
re-computed graph) is not supported and raises.

Order of operations. Backward communication only waits on higher ranks (a rank receives
gradients from ``r + 1``), forward only on lower ranks, and every rank runs the exchanges of its
layers in the same order, so there is no wait cycle; per-call tags keep transfers matched
on backends that honour tags (gloo).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

_FWD, _BWD = "forward", "backward"


@dataclass
class CommRecord:
    """One point-to-point transfer issued by a halo exchange.

    Attributes:
        call: index of the exchange in its forward pass (0 = first LLP layer).
        phase: ``"forward"`` (keys/values) or ``"backward"`` (their gradients).
        op: ``"send"`` or ``"recv"``.
        peer: global rank of the other side.
        numel: elements transferred; nbytes: bytes transferred.
    """

    call: int
    phase: str
    op: str
    peer: int
    numel: int
    nbytes: int


@dataclass
class CommCounter:
    """Counting wrapper around ``batch_isend_irecv``: records every transfer it issues.

    Pass one to :meth:`SequenceParallelGroups.context`; inspect ``records`` or use
    :meth:`totals`.
    """

    records: List[CommRecord] = field(default_factory=list)

    def batch_isend_irecv(self, ops: List[dist.P2POp], call: int, phase: str):
        for o in ops:
            self.records.append(
                CommRecord(
                    call=call,
                    phase=phase,
                    op="send" if o.op is dist.isend else "recv",
                    peer=o.peer,
                    numel=o.tensor.numel(),
                    nbytes=o.tensor.numel() * o.tensor.element_size(),
                )
            )
        return dist.batch_isend_irecv(ops)

    def totals(self, phase: str, op: str, unit: str = "numel") -> dict:
        """``{call: total}`` of ``numel`` or ``nbytes`` for one phase and op."""
        out: dict = {}
        for r in self.records:
            if r.phase == phase and r.op == op:
                out[r.call] = out.get(r.call, 0) + getattr(r, unit)
        return out

    def summary(self) -> dict:
        """Per-call element counts sent/received forward and backward, and bytes sent forward:
        ``{"fwd_send", "fwd_recv", "bwd_send", "bwd_recv", "fwd_send_bytes"}``, each as
        :meth:`totals` returns it."""
        return dict(fwd_send=self.totals("forward", "send"),
                    fwd_recv=self.totals("forward", "recv"),
                    bwd_send=self.totals("backward", "send"),
                    bwd_recv=self.totals("backward", "recv"),
                    fwd_send_bytes=self.totals("forward", "send", "nbytes"))


def _batch(counter: Optional[CommCounter], ops, call: int, phase: str):
    if not ops:
        return
    works = counter.batch_isend_irecv(ops, call, phase) if counter else dist.batch_isend_irecv(ops)
    for w in works:
        w.wait()


@dataclass
class _CacheEntry:
    k_sent: torch.Tensor
    v_sent: Optional[torch.Tensor]
    k_prev: Optional[torch.Tensor]
    v_prev: Optional[torch.Tensor]
    replayed: bool = False


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


class _HaloExchangeFn(torch.autograd.Function):
    """``(k_last, v_last) -> (k_prev, v_prev, anchor)``; see the module docstring.

    ``k_prev``/``v_prev`` are empty placeholders where there is nothing to receive (first rank,
    or no values with shared K/V); ``anchor`` is a zero scalar that keeps the backward alive.
    """

    @staticmethod
    def forward(ctx, sp: "SequenceParallelContext", call: int, replay: Optional[_CacheEntry],
                k: torch.Tensor, v: Optional[torch.Tensor]):
        ctx.sp, ctx.call, ctx.replay = sp, call, replay is not None
        ctx.has_v = v is not None
        ctx.device = k.device
        ctx.k_shape, ctx.k_dtype = k.shape, k.dtype
        ctx.v_shape = v.shape if v is not None else None
        ctx.v_dtype = v.dtype if v is not None else None
        if replay is not None:
            k_prev, v_prev = replay.k_prev, replay.v_prev
            k_prev = k_prev.clone() if k_prev is not None else None
            v_prev = v_prev.clone() if v_prev is not None else None
        else:
            k_prev, v_prev = sp._forward_transfer(call, k, v)
        anchor = k.new_zeros(())
        k_out = k_prev if k_prev is not None else _empty(k)
        v_out = v_prev if v_prev is not None else _empty(k)
        if k_prev is None:
            ctx.mark_non_differentiable(k_out)
        if v_prev is None:
            ctx.mark_non_differentiable(v_out)
        return k_out, v_out, anchor

    @staticmethod
    def backward(ctx, g_k_prev, g_v_prev, g_anchor):
        if ctx.replay:
            raise RuntimeError(
                "sequence-parallel halo exchange: the backward of a re-computed (checkpointed) "
                "forward was executed. Reentrant activation checkpointing is not supported; use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
            )
        g_k, g_v = ctx.sp._backward_transfer(ctx, g_k_prev, g_v_prev)
        return None, None, None, g_k, g_v


class _BackwardStarted(torch.autograd.Function):
    """Identity on the loss whose backward flags its context: ``backward_started = True``."""

    @staticmethod
    def forward(ctx, loss, sp):
        ctx.sp = sp
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        ctx.sp.backward_started = True
        return grad, None


class SequenceParallelContext:
    """The object an LLP model calls under sequence parallelism (one per forward pass).

    See ``docs/internals.md`` (sequence parallel hook) and the module docstring.

    Attributes:
        position_offset: global position (tokens) of this rank's first input token; the model
            uses it for RoPE.
        sp_rank, sp_size: this rank's chunk index and the group size ``P``.
        counter: optional :class:`CommCounter` recording every transfer.
        calls: number of (non-replay) exchanges made so far in this forward.
    """

    def __init__(self, group, group_ranks, sp_rank: int, position_offset: int,
                 counter: Optional[CommCounter] = None):
        self.group = group
        self.group_ranks = tuple(int(r) for r in group_ranks)
        self.sp_rank = int(sp_rank)
        self.sp_size = len(self.group_ranks)
        self.position_offset = int(position_offset)
        self.counter = counter
        self.prev_rank = self.group_ranks[self.sp_rank - 1] if self.sp_rank > 0 else None
        self.next_rank = (
            self.group_ranks[self.sp_rank + 1] if self.sp_rank + 1 < self.sp_size else None
        )
        self.calls = 0
        self.backward_started = False  # set by the backward of add_halo_terms' marker
        self._cache: List[_CacheEntry] = []
        self._anchors: List[torch.Tensor] = []

    @property
    def is_first(self) -> bool:
        """True on the group's first rank (it receives no halo)."""
        return self.prev_rank is None

    # --- the hook the model calls ------------------------------------------------------------
    def exchange_halo(self, k_last: torch.Tensor, v_last: Optional[torch.Tensor]
                      ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Send this rank's last-segment keys/values to ``r + 1``, receive those of ``r - 1``.

        Args:
            k_last: keys of this rank's last local segment, ``(B, H, L, d)`` (post-RoPE as the
                model uses them).
            v_last: values ``(B, H, L, d)``, or ``None`` when keys double as values (shared K/V).

        Returns:
            ``(k_prev, v_prev)`` of the previous rank's last segment, same shapes and dtypes
            (``v_prev`` is ``None`` when ``v_last`` is), or ``None`` on the group's first rank.
            Gradients w.r.t. them flow back to rank ``r - 1`` in backward.

        Raises:
            RuntimeError: re-computation inside backward whose keys/values match no cached
                forward call (non-deterministic recomputation, or reentrant checkpointing).
        """
        if self.backward_started:  # a checkpoint re-computation: the one replay guard
            entry = self._find_replay(k_last, v_last)
            k_prev, v_prev, _ = _HaloExchangeFn.apply(self, -1, entry, k_last, v_last)
        else:
            call = self.calls
            self.calls += 1
            k_prev, v_prev, anchor = _HaloExchangeFn.apply(self, call, None, k_last, v_last)
            if anchor.requires_grad:
                self._anchors.append(anchor)
                self._cache.append(
                    _CacheEntry(
                        k_sent=k_last.detach().clone(),
                        v_sent=v_last.detach().clone() if v_last is not None else None,
                        k_prev=k_prev.detach() if not self.is_first else None,
                        v_prev=v_prev.detach() if (not self.is_first and v_last is not None)
                        else None,
                    )
                )
        if self.is_first:
            return None
        return k_prev, (v_prev if v_last is not None else None)

    def add_halo_terms(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss + halo_loss_term()`` (same value), with ``loss`` passed through a marker whose
        backward records that this forward's backward pass has begun (so exchanges called from then
        on are activation-checkpoint replays). Call it once per forward, on this rank's loss, and
        back-propagate through the result."""
        marked = _BackwardStarted.apply(loss, self)
        return marked + self.halo_loss_term().to(loss.device)

    def halo_loss_term(self) -> torch.Tensor:
        """Zero scalar (fp32) to add to this rank's loss so every exchange's backward runs.

        Call it once per forward, after the model: it hands over (and forgets) the anchors of the
        exchanges made so far, so the context holds no reference into the autograd graph (no
        reference cycle keeping activations alive). Returns a plain ``0.0`` tensor when no
        exchange recorded a graph (evaluation, ``P = 1``).
        """
        anchors, self._anchors = self._anchors, []
        if not anchors:
            return torch.zeros(())
        return torch.stack([a.float() for a in anchors]).sum()

    # --- internals ---------------------------------------------------------------------------
    def _find_replay(self, k, v) -> _CacheEntry:
        shape_ok = [
            e for e in reversed(self._cache)
            if not e.replayed and e.k_sent.shape == k.shape
        ]
        for e in shape_ok:
            if torch.equal(e.k_sent, k.detach()) and (
                v is None or (e.v_sent is not None and torch.equal(e.v_sent, v.detach()))
            ):
                e.replayed = True
                return e
        # Bitwise-different recomputation (e.g. non-deterministic kernels): nearest within tolerance.
        best, best_err = None, None
        for e in shape_ok:
            err = (e.k_sent.float() - k.detach().float()).abs().max().item()
            if best_err is None or err < best_err:
                best, best_err = e, err
        if best is not None and best_err <= 1e-3 * (1.0 + k.detach().float().abs().max().item()):
            best.replayed = True
            return best
        raise RuntimeError(
            "sequence-parallel halo exchange called inside backward with keys/values that match "
            f"no exchange of the forward pass ({len(self._cache)} cached, closest max error "
            f"{best_err}). Activation checkpointing must be non-reentrant "
            "(use_reentrant=False) and deterministic."
        )

    def _forward_transfer(self, call, k, v):
        ops = []
        sends = [k] + ([v] if v is not None else [])
        recv_k = recv_v = None
        if self.next_rank is not None:
            for t in sends:
                ops.append(dist.P2POp(dist.isend, t.detach().contiguous(), self.next_rank,
                                      self.group, tag=2 * call))
        if self.prev_rank is not None:
            recv_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
            ops.append(dist.P2POp(dist.irecv, recv_k, self.prev_rank, self.group, tag=2 * call))
            if v is not None:
                recv_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
                ops.append(dist.P2POp(dist.irecv, recv_v, self.prev_rank, self.group,
                                      tag=2 * call))
        _batch(self.counter, ops, call, _FWD)
        return recv_k, recv_v

    def _backward_transfer(self, ctx, g_k_prev, g_v_prev):
        ops = []
        call = ctx.call
        if self.prev_rank is not None:
            gk = g_k_prev if g_k_prev is not None else torch.zeros(
                ctx.k_shape, dtype=ctx.k_dtype, device=ctx.device)
            ops.append(dist.P2POp(dist.isend, gk.contiguous(), self.prev_rank, self.group,
                                  tag=2 * call + 1))
            if ctx.has_v:
                gv = g_v_prev if g_v_prev is not None else torch.zeros(
                    ctx.v_shape, dtype=ctx.v_dtype, device=ctx.device)
                ops.append(dist.P2POp(dist.isend, gv.contiguous(), self.prev_rank, self.group,
                                      tag=2 * call + 1))
        g_k = g_v = None
        if self.next_rank is not None:
            dev = ctx.device
            g_k = torch.empty(ctx.k_shape, dtype=ctx.k_dtype, device=dev)
            ops.append(dist.P2POp(dist.irecv, g_k, self.next_rank, self.group, tag=2 * call + 1))
            if ctx.has_v:
                g_v = torch.empty(ctx.v_shape, dtype=ctx.v_dtype, device=dev)
                ops.append(dist.P2POp(dist.irecv, g_v, self.next_rank, self.group,
                                      tag=2 * call + 1))
        _batch(self.counter, ops, call, _BWD)
        return g_k, g_v

