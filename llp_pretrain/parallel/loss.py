"""Sequence-parallel language-model loss: local forward, group-reduced loss and token count.

Each rank scores its own ``N / P`` positions. The loss *value* and token count are summed over
the sequence-parallel group (so logging sees the single-rank numbers), while the *gradient* each
rank back-propagates is that of its own tokens only (plus the halo gradients that arrive from
rank ``r + 1`` through :mod:`~llp_pretrain.parallel.halo`). DeepSpeed then sums the replicated
weights' gradients over the ``P`` peers and averages over data-parallel replicas (see
:mod:`~llp_pretrain.parallel.groups`), which reproduces the single-rank gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..models.loss import lm_loss
from .chunking import local_chunk
from .groups import SequenceParallelGroups
from .halo import CommCounter

#: variants whose attention only looks one segment back and so can be split by segments
SEQUENCE_PARALLEL_VARIANTS = ("llp",)


def check_sequence_parallel_variant(variant: str, sequence_parallel_size: int) -> None:
    """Refuse ``P > 1`` for variants other than ``llp``.

    Raises:
        ValueError: naming the variant and ``parallel.sequence_parallel_size``.
    """
    if int(sequence_parallel_size) > 1 and variant not in SEQUENCE_PARALLEL_VARIANTS:
        raise ValueError(
            f"parallel.sequence_parallel_size={sequence_parallel_size} needs model.variant "
            f"'llp' (its attention looks only one segment back, so a sequence can be split "
            f"with a one-segment halo); variant {variant!r} attends over the whole window. "
            f"Set parallel.sequence_parallel_size: 1 or use variant 'llp'"
        )


def _model_cfg(model):
    m = getattr(model, "module", model)  # DeepSpeed engine or plain module
    return getattr(m, "cfg", None) or getattr(m, "config", None)


def sequence_parallel_lm_loss(
    model,
    tokens: torch.Tensor,
    groups: SequenceParallelGroups,
    segment_len: Optional[int] = None,
    counter: Optional[CommCounter] = None,
    grad_scale: float = 1.0,
) -> Tuple[torch.Tensor, int]:
    """The sequence-parallel counterpart of ``llp_pretrain.models.lm_loss``.

    Args:
        model: an LLP ``LMModel`` (or a DeepSpeed engine wrapping one) accepting
            ``model(input_ids, seq_parallel=ctx)``.
        tokens: ``(B, N + 1)`` whole samples, identical on the ``P`` ranks of a group.
        groups: the process groups (:func:`initialize_sequence_parallel`).
        segment_len: LLP ``L``; read from the model's config when omitted.
        counter: optional :class:`CommCounter` recording the halo transfers.
        grad_scale: factor on the back-propagated gradient (not on the value); ``P`` under
            DeepSpeed ZeRO-3 (:func:`~llp_pretrain.parallel.engine_glue.zero_grad_scale`).

    Returns:
        ``(loss_sum, n_tokens)`` (fp32 scalar tensor in nats, int) equal on all ranks of the
        group to the single-rank ``lm_loss`` over the whole samples; ``loss_sum``
        back-propagates only this rank's share (call backward on ``loss_sum / n_tokens``).
        With ``P == 1`` this is exactly ``lm_loss(model, tokens)``.

    Raises:
        ValueError: non-LLP variant with ``P > 1``; ``N`` not divisible by ``P * L``.
    """
    p = groups.sequence_parallel_size
    cfg = _model_cfg(model)
    if cfg is not None:
        check_sequence_parallel_variant(getattr(cfg, "variant", "llp"), p)
        if segment_len is None:
            segment_len = cfg.segment_len
    if segment_len is None:
        raise ValueError("segment_len is required (the model exposes no cfg.segment_len)")
    if p == 1:
        return lm_loss(model, tokens.long().to(_param_device(model)))
    chunk = local_chunk(tokens, groups.sp_rank, p, segment_len)
    ctx = groups.context(chunk.position_offset, counter=counter)
    n = chunk.input_ids.shape[1]
    # this rank's inputs plus the one token after them: lm_loss scores position i against i + 1
    window = tokens[:, chunk.position_offset:chunk.position_offset + n + 1].long()
    local_sum, local_n = lm_loss(model, window.to(_param_device(model)), seq_parallel=ctx)
    return reduce_over_group(local_sum, local_n, ctx, groups.get_sequence_parallel_group(), grad_scale)


def reduce_over_group(local_sum: torch.Tensor, local_n: int, ctx, group, grad_scale: float = 1.0
                      ) -> Tuple[torch.Tensor, int]:
    """The sequence-parallel loss reduction (the one copy; the engine's plug uses it too).

    Args:
        local_sum: this rank's summed loss (nats) over its ``local_n`` positions, with autograd.
        ctx: the forward's :class:`~llp_pretrain.parallel.halo.SequenceParallelContext`; its halo
            anchors are added (value 0) and the loss marks the start of backward for it.
        group: the sequence-parallel process group; grad_scale: factor on the gradient only.

    Returns ``(loss_sum, n_tokens)``: value and count summed over ``group``; the gradient is
    ``grad_scale`` times this rank's own share."""
    local = ctx.add_halo_terms(local_sum)
    totals = torch.stack([local.detach().float(), torch.tensor(float(local_n), device=local.device)])
    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    # value: the group's total; gradient: this rank's own tokens only
    scaled = local * grad_scale if grad_scale != 1.0 else local
    return scaled + (totals[0] - scaled.detach()), int(round(totals[1].item()))


def _param_device(model) -> torch.device:
    for prm in model.parameters():
        return prm.device
    return torch.device("cpu")
