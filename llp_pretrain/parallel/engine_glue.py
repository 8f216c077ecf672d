"""What the training engine needs from sequence parallelism (``engine.build_parallel_context``).

The engine (``llp_pretrain/engine.py``) calls :func:`engine_context` once when
``parallel.sequence_parallel_size > 1`` and then, per micro-batch, in ``compute_loss``::

    loss_sum, n = lm_loss(model, sp.local_chunk(tokens), seq_parallel=sp.seq_parallel)
    loss_sum, n = sp.reduce_loss(loss_sum, n)

and passes ``sp.mpu`` to ``deepspeed.initialize``. :class:`EngineSequenceParallel` implements
that: ``local_chunk`` starts a fresh halo-exchange context for the micro-batch and returns this
rank's window ``tokens[:, o : o + N/P + 1]``; ``seq_parallel`` (the object itself) forwards
``position_offset``/``exchange_halo`` to that context; ``reduce_loss`` adds the halo anchors and
sums the loss value and token count over the sequence-parallel group while keeping this rank's
own gradient (see :mod:`~llp_pretrain.parallel.loss`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .chunking import check_divisible, local_chunk
from .groups import SequenceParallelGroups, initialize_sequence_parallel
from .halo import CommCounter, SequenceParallelContext
from .loss import check_sequence_parallel_variant, reduce_over_group


class EngineSequenceParallel:
    """Sequence-parallel plug for the engine: ``mpu``, ``seq_parallel``, ``local_chunk``,
    ``reduce_loss`` (contract in ``training.loss.SequenceParallelContext``).

    Attributes:
        mpu: the :class:`SequenceParallelGroups` (DeepSpeed ``mpu``).
        segment_len: LLP ``L`` (tokens).
        counter: optional :class:`CommCounter` shared by every micro-batch's exchanges.
    """

    def __init__(self, groups: SequenceParallelGroups, segment_len: int,
                 counter: Optional[CommCounter] = None, grad_scale: float = 1.0):
        self.mpu = groups
        self.segment_len = int(segment_len)
        self.grad_scale = float(grad_scale)
        self.counter = counter
        self._ctx: Optional[SequenceParallelContext] = None

    # the engine hands ``seq_parallel`` to the model; it is this object, which forwards to the
    # current micro-batch's halo context
    @property
    def seq_parallel(self) -> "EngineSequenceParallel":
        return self

    @property
    def position_offset(self) -> int:
        """Global position (tokens) of this rank's first input token in the current micro-batch."""
        return self._current().position_offset

    def exchange_halo(self, k_last, v_last):
        """See :meth:`SequenceParallelContext.exchange_halo`."""
        return self._current().exchange_halo(k_last, v_last)

    def local_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's window ``(B, N/P + 1)`` of whole samples ``(B, N + 1)`` (inputs plus the
        next token, what ``lm_loss`` takes); starts the micro-batch's halo context.

        Raises:
            ValueError: ``N`` not divisible by ``P * segment_len``.
        """
        g = self.mpu
        chunk = local_chunk(tokens, g.sp_rank, g.sequence_parallel_size, self.segment_len)
        n = chunk.input_ids.shape[1]
        self._ctx = g.context(chunk.position_offset, counter=self.counter)
        return tokens[:, chunk.position_offset:chunk.position_offset + n + 1]

    def reduce_loss(self, loss_sum: torch.Tensor, n_tokens) -> Tuple[torch.Tensor, int]:
        """Sum loss and token count over the sequence-parallel group.

        Returns ``(loss_sum, n_tokens)``: the value of ``loss_sum`` is the group's total (the
        single-rank loss sum of the whole samples); its gradient is ``grad_scale`` times this
        rank's share, plus the zero-valued halo anchors that keep every exchange's backward
        running (``grad_scale`` is ``P`` under ZeRO-3, see :func:`zero_grad_scale`).
        """
        return reduce_over_group(loss_sum, n_tokens, self._current(), self.mpu.get_sequence_parallel_group(),
                                 self.grad_scale)

    def prepare_model(self, model, ds_config: dict):
        """Called by the engine right before ``deepspeed.initialize`` (after the optimizer
        exists). With ZeRO-3 the parameters are partitioned here over the
        sequence-data-parallel group (all ranks): left to ``deepspeed.initialize``, DeepSpeed
        0.19 would partition them over ``mpu.get_data_parallel_group()`` only, so gradients
        would never be summed over sequence-parallel peers. Other stages: unchanged.

        Returns the same module (parameters converted in place).
        """
        zero = (ds_config or {}).get("zero_optimization", {}) or {}
        if int(zero.get("stage", 0)) != 3:
            return model
        import deepspeed

        # deepspeed.comm must wrap the existing process group before zero.Init reads the layout
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   dist_init_required=False)
        deepspeed.zero.Init(module=model,
                            data_parallel_group=self.mpu.get_sequence_data_parallel_group(),
                            config_dict_or_path=ds_config, mpu=self.mpu)
        return model

    def _current(self) -> SequenceParallelContext:
        if self._ctx is None:
            raise RuntimeError(
                "sequence-parallel context used before local_chunk(tokens) started a micro-batch"
            )
        return self._ctx


def zero_grad_scale(ds_config: dict, sequence_parallel_size: int) -> float:
    """Factor on each rank's gradient so DeepSpeed's reduction yields the single-process one.

    ZeRO 0, 1 and 2 (``engine._reduce_non_expert_gradients``, ``stage_1_and_2``) divide the sum
    over the sequence-data-parallel group by ``world / P``: a sum over sequence-parallel peers, a
    mean over replicas; factor 1. ZeRO-3's reduce-scatter path (``stage3.__avg_scatter_grads`` ->
    ``reduce_scatter_coalesced``, DeepSpeed 0.19) divides by the whole group size ``world`` and
    ignores ``P``, so each rank scales its gradient by ``P``. Its other path (all-reduce of a
    contiguous bucket, taken only with ``reduce_scatter: false``) does apply ``P`` but falls back
    to reduce-scatter for buckets larger than ``reduce_bucket_size``, so it cannot be used
    consistently: ``reduce_scatter: false`` is refused with ZeRO-3.

    Raises:
        ValueError: ZeRO-3 with ``zero_optimization.reduce_scatter: false`` and ``P > 1``, or
            ZeRO-3 with quantized gradients (a different reduction path) and ``P > 1``.
    """
    zero = (ds_config or {}).get("zero_optimization", {}) or {}
    if int(zero.get("stage", 0)) != 3 or sequence_parallel_size == 1:
        return 1.0
    if zero.get("reduce_scatter", True) is False:
        raise ValueError(
            "deepspeed zero_optimization.reduce_scatter: false is not supported with ZeRO-3 and "
            f"parallel.sequence_parallel_size={sequence_parallel_size}: DeepSpeed scales that "
            "path's gradients inconsistently (see docs/sequence_parallel.md); remove the key or "
            "set it to true"
        )
    if zero.get("zero_quantized_gradients", False):
        raise ValueError(
            "deepspeed zero_optimization.zero_quantized_gradients is not supported with "
            "sequence parallelism; remove it or set parallel.sequence_parallel_size: 1"
        )
    return float(sequence_parallel_size)


def engine_context(cfg, dist_info) -> EngineSequenceParallel:
    """Build the process groups and the engine plug for a run (collective: every rank calls it).

    Args:
        cfg: the validated ``RunConfig`` (``cfg.model`` an LLP ``ModelConfig``,
            ``cfg.parallel.sequence_parallel_size``).
        dist_info: the engine's ``DistInfo``; its ``layout`` (the run's one
            :class:`~llp_pretrain.layout.ParallelLayout`) becomes the DeviceMesh the groups come from.

    Raises:
        ValueError: non-LLP variant with ``P > 1``; ``model.seq_len`` not divisible by
            ``P * model.segment_len``; an unsupported ZeRO-3 reduction setting
            (:func:`zero_grad_scale`).
    """
    p = dist_info.layout.sp_size
    check_sequence_parallel_variant(cfg.model.variant, p)
    check_divisible(cfg.model.seq_len, p, cfg.model.segment_len)
    grad_scale = zero_grad_scale(getattr(cfg, "ds_config", None), p)
    groups = initialize_sequence_parallel(dist_info.layout)
    return EngineSequenceParallel(groups, cfg.model.segment_len, grad_scale=grad_scale)
