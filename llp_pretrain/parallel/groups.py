"""Data-parallel x sequence-parallel process groups and the ``mpu`` object DeepSpeed takes.

Layout (``docs/sequence_parallel.md``): the run's
:class:`~llp_pretrain.layout.ParallelLayout`, ``world_size = data_parallel_size * P``
with ``P = sequence_parallel_size``, as a ``(dp, sp)`` DeviceMesh whose rows are the
sequence-parallel groups (**consecutive** global ranks; ``sp_rank`` is the chunk of the sequence a
rank holds) and whose columns are the data-parallel groups (``dp_rank`` selects the samples; all
``P`` peers of one sequence-parallel group read the same samples).

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

from typing import List, Union

import torch
import torch.distributed as dist

from ..layout import ParallelLayout


class SequenceParallelGroups:
    """Process groups of the data-parallel x sequence-parallel grid; also DeepSpeed's ``mpu``.

    Build it with :func:`initialize_sequence_parallel` (every rank must call it, in the same
    order relative to other group creations). Pass it to
    ``deepspeed.initialize(..., mpu=groups)``; build the per-forward object the model calls with
    :meth:`context`. ``layout`` is the run's :class:`~llp_pretrain.layout.ParallelLayout`,
    ``coords`` this rank's place in it, ``mesh`` the ``(dp, sp)`` DeviceMesh the groups come from.
    """

    def __init__(self, layout: ParallelLayout, rank: int, mesh, world_group, self_group):
        self.layout = layout
        self.coords = layout.coords(rank)
        self.mesh = mesh
        self._sp_group = mesh.get_group("sp")
        self._dp_group = mesh.get_group("dp")
        self._world_group = world_group
        self._self_group = self_group

    # --- convenience -----------------------------------------------------------------------
    @property
    def sequence_parallel_size(self) -> int:
        """``P``."""
        return self.layout.sp_size

    @property
    def data_parallel_size(self) -> int:
        """``world_size // P``."""
        return self.layout.dp_size

    @property
    def sp_rank(self) -> int:
        """Chunk index of this rank within its sequence-parallel group."""
        return self.coords.sp_rank

    @property
    def dp_rank(self) -> int:
        """Data-parallel replica index (selects samples)."""
        return self.coords.dp_rank

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
            group_ranks=self.coords.sp_ranks,
            sp_rank=self.sp_rank,
            position_offset=position_offset,
            counter=counter,
        )

    # --- sequence parallel (DeepSpeed mpu) ---------------------------------------------------
    def get_sequence_parallel_group(self):
        return self._sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.layout.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.coords.sp_rank

    # --- sequence x data parallel: gradient reduction / ZeRO partitioning -------------------
    def get_sequence_data_parallel_group(self):
        return self._world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.layout.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.coords.rank

    # --- data parallel: sampling, batch-size arithmetic --------------------------------------
    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.coords.dp_rank

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self.coords.dp_ranks)

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
        return f"SequenceParallelGroups(rank={self.coords.rank}, {self.layout}, sp_rank={self.sp_rank}, dp_rank={self.dp_rank})"


def initialize_sequence_parallel(layout: Union[ParallelLayout, int]) -> SequenceParallelGroups:
    """Create the ``(dp, sp)`` DeviceMesh (its ``"sp"`` and ``"dp"`` groups), the world group and the
    one-rank group (collective: every rank of the default group calls it, with the same layout).

    ``layout``: the run's :class:`ParallelLayout`, or ``sequence_parallel_size`` (the world size is
    the default group's). Each new group is touched by one small all-reduce so that a later batched
    isend/irecv is never the first operation on a group (NCCL requires that).

    Returns:
        SequenceParallelGroups for the calling rank (also usable as DeepSpeed ``mpu``).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        LayoutError: the default group's size does not fit the layout.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_sequence_parallel needs torch.distributed to be initialized "
            "(dist.init_process_group or deepspeed.init_distributed) first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(layout, ParallelLayout):
        layout = ParallelLayout(world, layout)
    device = _collective_device()
    mesh = layout.build_mesh(device.type)
    # DeepSpeed reduces gradients over all ranks: a group of its own, as the mesh's groups are
    world_group = dist.new_group(ranks=list(range(world)))
    # the one-rank "model-parallel" group: only its member needs to take part in creating it
    self_group = dist.new_group(ranks=[rank], use_local_synchronization=True)
    groups = SequenceParallelGroups(layout, rank, mesh, world_group, self_group)
    for g in (groups.get_sequence_parallel_group(), groups.get_data_parallel_group(), world_group):
        dist.all_reduce(torch.zeros(1, device=device), group=g)
    return groups


def _collective_device() -> torch.device:
    """The device tensors must live on for the default backend (cuda for NCCL, else cpu)."""
    backend = dist.get_backend()
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
