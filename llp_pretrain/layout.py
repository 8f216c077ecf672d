"""The one data-parallel x sequence-parallel layout of a run: arithmetic, batch rule and DeviceMesh.

:class:`ParallelLayout` is built once from ``world_size`` (processes) and
``sequence_parallel_size`` (``P``) and is the only place that knows where a rank sits:

* ``world_size = data_parallel_size * P``; the mesh has shape ``(dp, sp) = (world_size / P, P)``
  with dimension names ``("dp", "sp")`` in row-major order, so global rank
  ``g = dp_rank * P + sp_rank``: the ``P`` peers of one sequence-parallel group are consecutive
  ranks (keeps the halo exchange inside a node when ``nproc_per_node`` is a multiple of ``P``)
  and all of them read the same samples (``dp_rank`` selects the samples);
* ``global_batch_size = micro_batch_size * grad_accum_steps * data_parallel_size``.

The same object serves config validation and the launchers' pre-flight check (pure Python, no
process group: :meth:`ParallelLayout.problem`, :meth:`ParallelLayout.batch`), the engine
(:meth:`ParallelLayout.coords`) and the process groups (:meth:`ParallelLayout.build_mesh`, a
``torch.distributed.device_mesh.DeviceMesh``; ``llp_pretrain.parallel.groups`` wraps it as
DeepSpeed's ``mpu``). torch is imported only by :meth:`build_mesh`, so config validation and the launchers
use this module without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["LayoutError", "ParallelLayout", "RankCoords", "MESH_DIM_NAMES"]

#: DeviceMesh dimension names, outer (data parallel) to inner (sequence parallel)
MESH_DIM_NAMES = ("dp", "sp")


class LayoutError(ValueError):
    """A world size, sequence-parallel size or batch size that cannot form a layout; the message
    (one line) says which numbers clash and what would work."""


@dataclass(frozen=True)
class RankCoords:
    """One rank's place in the grid: ``rank = dp_rank * sp_size + sp_rank``.

    ``sp_ranks``: the global ranks of its sequence-parallel group in chunk order;
    ``dp_ranks``: those of its data-parallel group in ``dp_rank`` order."""

    rank: int
    dp_rank: int
    sp_rank: int
    sp_ranks: Tuple[int, ...]
    dp_ranks: Tuple[int, ...]


@dataclass(frozen=True)
class ParallelLayout:
    """``world_size`` processes as ``dp_size x sp_size`` (see the module docstring).

    Raises :class:`LayoutError` on construction when a size is not a positive integer or
    ``world_size`` is not a multiple of ``sp_size``."""

    world_size: int
    sp_size: int = 1

    def __post_init__(self) -> None:
        why = self.problem(self.world_size, self.sp_size)
        if why:
            raise LayoutError(why)

    @staticmethod
    def problem(world_size: int, sp_size: int, detail: str = "") -> Optional[str]:
        """Why ``world_size`` processes cannot run ``sequence_parallel_size=sp_size`` (one line, saying
        what would work), or None. ``detail`` follows the world size in the message (e.g. the launcher's
        ``" (2 node(s) x 3 process(es))"``)."""
        for name, v in (("world_size", world_size), ("parallel.sequence_parallel_size", sp_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return f"{name} must be a positive integer, got {v!r}"
        if world_size < sp_size:
            return (f"too few processes for sequence parallelism: world_size={world_size}{detail} < "
                    f"parallel.sequence_parallel_size={sp_size}; start at least {sp_size} processes or lower "
                    f"parallel.sequence_parallel_size")
        if world_size % sp_size:
            lo = world_size // sp_size * sp_size
            return (f"world_size={world_size}{detail} is not divisible by parallel.sequence_parallel_size="
                    f"{sp_size}; use a multiple of {sp_size} processes (e.g. {lo} or {lo + sp_size}) or a "
                    f"sequence_parallel_size that divides {world_size}")
        return None

    @property
    def dp_size(self) -> int:
        """``data_parallel_size = world_size / sp_size``."""
        return self.world_size // self.sp_size

    @property
    def shape(self) -> Tuple[int, int]:
        """The mesh shape ``(dp_size, sp_size)`` (dimension names :data:`MESH_DIM_NAMES`)."""
        return (self.dp_size, self.sp_size)

    def coords(self, rank: int) -> RankCoords:
        """Where global ``rank`` sits; :class:`LayoutError` if it is outside ``[0, world_size)``."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank!r} is outside [0, {self.world_size})")
        dp_rank, sp_rank = divmod(rank, self.sp_size)
        return RankCoords(rank, dp_rank, sp_rank,
                          sp_ranks=tuple(self.sp_groups()[dp_rank]), dp_ranks=tuple(self.dp_groups()[sp_rank]))

    def sp_groups(self) -> List[List[int]]:
        """Every sequence-parallel group (rows of the mesh), in ``dp_rank`` order."""
        return [[d * self.sp_size + s for s in range(self.sp_size)] for d in range(self.dp_size)]

    def dp_groups(self) -> List[List[int]]:
        """Every data-parallel group (columns of the mesh), in ``sp_rank`` order."""
        return [[d * self.sp_size + s for d in range(self.dp_size)] for s in range(self.sp_size)]

    def batch(self, micro_batch_size: int, grad_accum_steps: Optional[int] = None,
              global_batch_size: Optional[int] = None) -> Tuple[int, int]:
        """``(grad_accum_steps, global_batch_size)`` from the rule
        ``global = micro * grad_accum * dp_size``: the one missing is derived (``grad_accum_steps``
        defaults to 1 when both are missing); both given must agree. Raises :class:`LayoutError`."""
        per_step = micro_batch_size * self.dp_size
        if grad_accum_steps is None and global_batch_size is None:
            grad_accum_steps = 1
        if grad_accum_steps is None:
            if global_batch_size % per_step or global_batch_size < per_step:
                raise LayoutError(
                    f"train.global_batch_size={global_batch_size} is not a positive multiple of "
                    f"train.micro_batch_size={micro_batch_size} x data_parallel_size={self.dp_size} (= {per_step}); "
                    f"use e.g. {max(per_step, global_batch_size // per_step * per_step)} or change the process count")
            return global_batch_size // per_step, global_batch_size
        want = per_step * grad_accum_steps
        if global_batch_size is not None and global_batch_size != want:
            raise LayoutError(
                f"train.global_batch_size={global_batch_size} != train.micro_batch_size={micro_batch_size} x "
                f"train.grad_accum_steps={grad_accum_steps} x data_parallel_size={self.dp_size} (= {want}); "
                f"set train.global_batch_size={want}, drop one of the two, or change the process count")
        return grad_accum_steps, want

    def build_mesh(self, device_type: str):
        """The ``(dp, sp)`` :class:`torch.distributed.device_mesh.DeviceMesh` over the default process
        group (collective: every rank calls it, once). ``device_type``: ``"cuda"`` or ``"cpu"``.

        Raises :class:`LayoutError` if the default group's world size is not ``world_size``."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if dist.is_initialized() and dist.get_world_size() != self.world_size:
            raise LayoutError(f"the process group has {dist.get_world_size()} ranks but the layout "
                              f"{self.dp_size} x {self.sp_size} needs {self.world_size}")
        return init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIM_NAMES)

    def __str__(self) -> str:
        return (f"world_size={self.world_size} = data_parallel_size={self.dp_size} x "
                f"sequence_parallel_size={self.sp_size}")
