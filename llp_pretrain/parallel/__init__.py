"""Sequence parallelism for LLP: split a sequence over ranks by whole segments.

Public API (see ``docs/sequence_parallel.md``):

* :func:`initialize_sequence_parallel` -> :class:`SequenceParallelGroups` (process groups;
  also the ``mpu`` for ``deepspeed.initialize``) from :class:`ParallelLayout`, the one
  data-parallel x sequence-parallel layout (pure arithmetic, builds the DeviceMesh).
* :class:`SequenceParallelContext`: the object the model calls (``exchange_halo``,
  ``position_offset``); :class:`CommCounter` records every transfer.
* :func:`local_chunk`, :func:`check_divisible`: this rank's share of a batch.
* :func:`sequence_parallel_lm_loss`: loss and token count reduced over the group;
  :func:`check_sequence_parallel_variant` refuses ``P > 1`` for non-LLP variants.
* :func:`engine_context` -> :class:`EngineSequenceParallel`: the plug the training engine calls
  (``engine.build_parallel_context``).
"""
from .chunking import LocalChunk, check_divisible, local_chunk
from .engine_glue import EngineSequenceParallel, engine_context, zero_grad_scale
from .groups import SequenceParallelGroups, initialize_sequence_parallel
from ..layout import LayoutError, ParallelLayout, RankCoords
from .halo import CommCounter, CommRecord, SequenceParallelContext
from .loss import (
    SEQUENCE_PARALLEL_VARIANTS,
    check_sequence_parallel_variant,
    sequence_parallel_lm_loss,
)

__all__ = [
    "CommCounter",
    "CommRecord",
    "EngineSequenceParallel",
    "LayoutError",
    "LocalChunk",
    "ParallelLayout",
    "RankCoords",
    "SEQUENCE_PARALLEL_VARIANTS",
    "SequenceParallelContext",
    "SequenceParallelGroups",
    "check_divisible",
    "check_sequence_parallel_variant",
    "engine_context",
    "initialize_sequence_parallel",
    "local_chunk",
    "sequence_parallel_lm_loss",
    "zero_grad_scale",
]
