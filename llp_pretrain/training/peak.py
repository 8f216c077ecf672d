"""The MFU denominator: the peak FLOP/s of one process's device, and where it came from.

In order: ``train.peak_flops`` when configured; the vendor table ``monitor.PEAK_FLOPS`` keyed by
the CUDA device name; otherwise a matmul measurement taken by all ranks at the same moment (after a
barrier), so that each sees the contention it will train under (ranks sharing a CPU split it), and
agreed on as the maximum over ranks. A measurement is a lower bound of the true peak: when the
achieved model FLOP/s ever exceeds it, the peak in use is raised to the achieved rate (logged as
``train/peak_flops`` with a console line), so the logged MFU never exceeds 100%.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llp_pretrain.monitor import known_peak_flops, measure_peak_flops

from .distributed import all_reduce

__all__ = ["Peak", "resolve_peak"]


@dataclass
class Peak:
    """``flops``: per-process peak FLOP/s; ``source``: ``config``, ``table:<device name>`` or ``measured``."""

    flops: float
    source: str

    @property
    def measured(self) -> bool:
        return self.source == "measured"


def resolve_peak(configured, d, dtype: torch.dtype) -> Peak:
    """The :class:`Peak` for this run (collective when measured: every rank calls it)."""
    import torch.distributed as dist

    if configured:
        return Peak(float(configured), "config")
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        flops = known_peak_flops(name, dtype)
        if flops is not None:
            return Peak(flops, f"table:{name}")
    dist.barrier()  # all ranks measure together: the contention they will train under
    mine = measure_peak_flops(d.device, dtype)
    best, = all_reduce([mine], op="max", device=d.reduce_device)
    return Peak(best, "measured")
