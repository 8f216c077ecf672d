"""The loss of one micro-batch and the plug point for sequence parallelism.

:func:`compute_loss` is the one place the sequence-parallel code (``llp_pretrain.parallel``) plugs
into the training step: it slices this rank's chunk, passes the model its ``seq_parallel`` object
and sums the loss over the sequence-parallel group.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["SequenceParallelContext", "build_parallel_context", "compute_loss"]


class SequenceParallelContext:
    """Plug point for ``llp_pretrain.parallel``: what the engine needs from sequence parallelism.

    ``mpu``: object passed to ``deepspeed.initialize`` (sequence/data-parallel groups) or None;
    ``seq_parallel``: per-step object handed to the model (``docs/internals.md``) or None;
    ``local_chunk(tokens)``: this rank's slice of a ``(B, N + 1)`` batch;
    ``reduce_loss(loss_sum, n_tokens)``: sums over the sequence-parallel group.
    With ``sequence_parallel_size == 1`` all of these are identities."""

    mpu = None
    seq_parallel = None

    def local_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def reduce_loss(self, loss_sum: torch.Tensor, n_tokens: int) -> Tuple[torch.Tensor, int]:
        return loss_sum, n_tokens

    def prepare_model(self, model, ds_config: Dict[str, Any]):
        """Called right before ``deepspeed.initialize`` (after the optimizer exists); may convert
        the model in place (e.g. ZeRO-3 partitioning over the right group). Returns the model."""
        return model


def build_parallel_context(cfg, dist_info) -> SequenceParallelContext:
    """The sequence-parallel context for this run. ``P == 1``: identities. ``P > 1``: built by
    ``llp_pretrain.parallel.engine_context(cfg, dist_info)`` when that package provides it.

    Raises ``NotImplementedError`` with what is missing otherwise."""
    if dist_info.sp_size == 1:
        return SequenceParallelContext()
    try:
        from llp_pretrain.parallel import engine_context  # provided by the sequence-parallel package
    except ImportError as e:
        raise NotImplementedError(
            f"parallel.sequence_parallel_size={dist_info.sp_size} needs llp_pretrain.parallel.engine_context "
            f"(not available: {e}); run with sequence_parallel_size: 1") from e
    return engine_context(cfg, dist_info)


def compute_loss(model, tokens: torch.Tensor, sp: Optional[SequenceParallelContext] = None):
    """Mean next-token loss of one micro-batch.

    Args:
        model: the DeepSpeed engine (or module); called as ``model(input_ids, seq_parallel=...)``.
        tokens: ``(B, N + 1)`` int64 shard samples (the full sequence; ``sp`` slices its chunk).
        sp: sequence-parallel context (identity when None).

    Returns ``(loss, loss_sum, n_tokens)``: ``loss = loss_sum / n_tokens`` (nats per token; the value
    to backpropagate), summed over the sequence-parallel group."""
    from llp_pretrain.models import lm_loss

    sp = sp or SequenceParallelContext()
    kwargs = {"seq_parallel": sp.seq_parallel} if sp.seq_parallel is not None else {}
    loss_sum, n = lm_loss(model, sp.local_chunk(tokens), **kwargs)
    loss_sum, n = sp.reduce_loss(loss_sum, n)
    return loss_sum / n, loss_sum, n
