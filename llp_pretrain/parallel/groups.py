"""Data-parallel x sequence-parallel process groups and the ``mpu`` object DeepSpeed takes.

Layout (``docs/sequence_parallel.md``): ``world_size = data_parallel_size * P`` where
``P = sequence_parallel_size``. Sequence-parallel peers are **consecutive** global ranks:

* sequence-parallel group of rank ``g``: ``[(g // P) * P, ..., (g // P) * P + P - 1]``;
  ``sp_rank = g % P`` is the chunk of the sequence this rank holds.
* data-parallel group of rank ``g``: ``[g % P, g % P + P, g % P + 2P, ...]``;
  ``dp_rank = g // P`` selects the samples (all ``P`` peers of one sequence-parallel group
  read the same samples).
* sequence-data-parallel group: all ranks. DeepSpeed all-reduces (and ZeRO partitions) the
  gradients of the replicated weights over this group and divides by
  ``world_size / P = data_parallel_size``, so the result is the *sum* over the ``P`` chunks of
  one sample (each rank back-propagates only its own tokens' share of the loss) and the *mean*
  over data-parallel replicas, i.e. exactly the single-process gradient of the global batch.

``SequenceParallelGroups`` implements the methods DeepSpeed 0.19's engine and ZeRO optimizers
call on ``mpu`` (``deepspeed/utils/groups.py``, ``runtime/engine.py``,
``runtime/zero/stage_1_and_2.py``, ``runtime/zero/stage3.py``, ``runtime/utils.py``):
``get_sequence_parallel_{group,world_size,rank}``,
``get_sequence_data_parallel_{group,world_size,rank}``, ``get_data_parallel_{group,world_size,
rank,group_ranks}``, ``get_model_parallel_{group,world_size,rank}`` and the
``get_tensor_model_parallel_*`` aliases (a one-rank group: there is no tensor parallelism).
It deliberately has no ``initialize_sequence_parallel`` attribute: DeepSpeed treats an mpu with
that attribute as a legacy Megatron object and ignores its data-parallel group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """Where one global rank sits in the data-parallel x sequence-parallel grid (pure arithmetic).

    Attributes:
        rank, world_size: global rank and world size.
        sequence_parallel_size: ``P``, ranks that share one sample (consecutive ranks).
        data_parallel_size: ``world_size // P``.
        sp_rank: ``rank % P``: which ``N / P`` chunk of the sequence this rank holds.
        dp_rank: ``rank // P``: which data-parallel replica (selects the samples).
        sp_ranks: global ranks of this rank's sequence-parallel group, in chunk order.
        dp_ranks: global ranks of this rank's data-parallel group, in ``dp_rank`` order.
    """

    rank: int
    world_size: int
    sequence_parallel_size: int
    data_parallel_size: int
    sp_rank: int
    dp_rank: int
    sp_ranks: tuple
    dp_ranks: tuple


def make_topology(rank: int, world_size: int, sequence_parallel_size: int) -> Topology:
    """Compute the data-parallel x sequence-parallel position of ``rank``.

    Raises:
        ValueError: ``sequence_parallel_size`` < 1, ``world_size`` not divisible by it, or
            ``rank`` outside ``[0, world_size)``; the message says what to change
            (config key ``parallel.sequence_parallel_size`` or the number of processes).
    """
    p = int(sequence_parallel_size)
    if p < 1:
        raise ValueError(
            f"parallel.sequence_parallel_size must be >= 1, got {sequence_parallel_size}"
        )
    if world_size % p != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.sequence_parallel_size={p}: "
            f"world_size must equal data_parallel_size * sequence_parallel_size; launch a "
            f"multiple of {p} processes or change parallel.sequence_parallel_size"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    dp = world_size // p
    sp_rank, dp_rank = rank % p, rank // p
    return Topology(
        rank=rank,
        world_size=world_size,
        sequence_parallel_size=p,
        data_parallel_size=dp,
        sp_rank=sp_rank,
        dp_rank=dp_rank,
        sp_ranks=tuple(dp_rank * p + i for i in range(p)),
        dp_ranks=tuple(sp_rank + j * p for j in range(dp)),
    )


class SequenceParallelGroups:
    """Process groups of the data-parallel x sequence-parallel grid; also DeepSpeed's ``mpu``.

    Build it with :func:`initialize_sequence_parallel` (every rank must call it, in the same
    order relative to other group creations). Pass it to
    ``deepspeed.initialize(..., mpu=groups)``; build the per-forward object the model calls with
    :meth:`context`.
    """

    def __init__(self, topology: Topology, sp_group, dp_group, world_group, self_group):
        self.topology = topology
        self._sp_group = sp_group
        self._dp_group = dp_group
        self._world_group = world_group
        self._self_group = self_group

    # --- convenience -----------------------------------------------------------------------
    @property
    def sequence_parallel_size(self) -> int:
        """``P``."""
        return self.topology.sequence_parallel_size

    @property
    def data_parallel_size(self) -> int:
        """``world_size // P``."""
        return self.topology.data_parallel_size

    @property
    def sp_rank(self) -> int:
        """Chunk index of this rank within its sequence-parallel group."""
        return self.topology.sp_rank

    @property
    def dp_rank(self) -> int:
        """Data-parallel replica index (selects samples)."""
        return self.topology.dp_rank

    def context(self, position_offset: int, counter=None):
        """A fresh :class:`~llp_pretrain.parallel.halo.SequenceParallelContext` for one forward.

        Args:
            position_offset: global position (tokens) of this rank's first input token.
            counter: optional :class:`~llp_pretrain.parallel.halo.CommCounter` that records
                every point-to-point transfer.
        """
        from .halo import SequenceParallelContext

        return SequenceParallelContext(
            group=self._sp_group,
            group_ranks=self.topology.sp_ranks,
            sp_rank=self.sp_rank,
            position_offset=position_offset,
            counter=counter,
        )

    # --- sequence parallel (DeepSpeed mpu) ---------------------------------------------------
    def get_sequence_parallel_group(self):
        return self._sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.topology.sequence_parallel_size

    def get_sequence_parallel_rank(self) -> int:
        return self.topology.sp_rank

    # --- sequence x data parallel: gradient reduction / ZeRO partitioning -------------------
    def get_sequence_data_parallel_group(self):
        return self._world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.topology.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.topology.rank

    # --- data parallel: sampling, batch-size arithmetic --------------------------------------
    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.data_parallel_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.dp_rank

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self.topology.dp_ranks)

    # --- no tensor/pipeline model parallelism: a one-rank group -----------------------------
    def get_model_parallel_group(self):
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def __repr__(self) -> str:
        t = self.topology
        return (
            f"SequenceParallelGroups(rank={t.rank}, world_size={t.world_size}, "
            f"sequence_parallel_size={t.sequence_parallel_size}, sp_rank={t.sp_rank}, "
            f"data_parallel_size={t.data_parallel_size}, dp_rank={t.dp_rank})"
        )


def initialize_sequence_parallel(sequence_parallel_size: int) -> SequenceParallelGroups:
    """Create the sequence-parallel, data-parallel, world and one-rank groups (collective).

    Every rank of the default process group must call this with the same argument. Each new
    group is touched by one small all-reduce so that a later batched isend/irecv is never the
    first operation on a group (NCCL requires that).

    Returns:
        SequenceParallelGroups for the calling rank (also usable as DeepSpeed ``mpu``).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        ValueError: see :func:`make_topology`.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_sequence_parallel needs torch.distributed to be initialized "
            "(dist.init_process_group or deepspeed.init_distributed) first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = make_topology(rank, world, sequence_parallel_size)
    p, dp = topo.sequence_parallel_size, topo.data_parallel_size

    sp_group = dp_group = None
    # dist.new_group must be called by every rank for every group, in the same order.
    for j in range(dp):
        ranks = [j * p + i for i in range(p)]
        g = dist.new_group(ranks=ranks)
        if rank in ranks:
            sp_group = g
    for i in range(p):
        ranks = [i + j * p for j in range(dp)]
        g = dist.new_group(ranks=ranks)
        if rank in ranks:
            dp_group = g
    world_group = dist.new_group(ranks=list(range(world)))
    # the one-rank "model-parallel" group: only its member needs to take part in creating it
    self_group = dist.new_group(ranks=[rank], use_local_synchronization=True)

    device = _collective_device()
    for g in (sp_group, dp_group, world_group):
        dist.all_reduce(torch.zeros(1, device=device), group=g)
    return SequenceParallelGroups(topo, sp_group, dp_group, world_group, self_group)


def _collective_device() -> torch.device:
    """The device tensors must live on for the default backend (cuda for NCCL, else cpu)."""
    backend = dist.get_backend()
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_layout(sequence_parallel_size: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> Topology:
    """Topology from explicit values or from the initialized default group (no collectives)."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    return make_topology(rank, world_size, sequence_parallel_size)
