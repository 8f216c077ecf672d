"""TensorBoard and console monitoring, written by global rank 0 only.

Scalars (one point per log interval, ``step`` = optimizer steps done): ``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/tokens_per_sec``, ``train/mfu``, ``train/step_time`` (seconds),
``train/data_wait_fraction``, ``train/memory_gb``, ``train/skipped_steps``; at evaluations
``val/loss``, ``val/ppl``, ``val/bits_per_byte``; text ``samples/generated``; the hyper-parameters
(TensorBoard HParams plugin) once per run. On resume the writer is opened with
``purge_step = resumed step + 1`` so events a killed run wrote after its last checkpoint are
discarded by TensorBoard and every curve keeps unique, increasing steps.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["Monitor", "memory_gb", "measure_peak_flops", "format_eta"]


def memory_gb() -> float:
    """Peak memory of this process in GiB: CUDA max allocated on GPU, else max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30  # ru_maxrss is KiB on Linux


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: Optional[float] = None) -> float:
    """Achievable dense matmul FLOP/s on ``device`` (best of repeated square matmuls, 2*n^3 FLOPs each,
    for ``seconds``: 0.3 on GPU, 1.0 on CPU where a busy machine makes single rounds slow).

    Used as the MFU denominator when ``train.peak_flops`` is not configured. On a machine shared
    with other work the result is too low (MFU too high); configure the device's peak instead."""
    seconds = seconds if seconds is not None else (0.3 if device.type == "cuda" else 1.0)
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        (a @ b)
    end = time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < end:  # at least one timed round, however busy the machine
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = max(time.perf_counter() - t, 1e-9)
        best = max(best, 4 * 2 * n ** 3 / dt)
    return best


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` for a duration in seconds."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Monitor:
    """TensorBoard writer + console lines; a no-op on ranks other than global rank 0.

    Args:
        log_dir: ``RUN/tensorboard``.
        rank: global rank (``RANK``); only rank 0 writes.
        purge_step: first step this run will log (resumed step + 1) or None for a fresh run.
    """

    def __init__(self, log_dir: Path, rank: int, purge_step: Optional[int] = None):
        self.active = rank == 0
        self.writer = None
        if self.active:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        """Add scalars (``tag -> value``) at ``step``."""
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: Dict[str, Any], metrics: Dict[str, float]) -> None:
        """Record run hyper-parameters in the HParams plugin (same event file as the scalars)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(clean, metrics)
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)

    def console(self, line: str) -> None:
        if self.active:
            print(line, flush=True, file=sys.stdout)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
