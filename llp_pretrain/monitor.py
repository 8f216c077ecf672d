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

__all__ = ["Monitor", "memory_gb", "measure_peak_flops", "known_peak_flops", "PEAK_FLOPS", "format_eta"]


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


#: Vendor dense (no sparsity) tensor-core peak FLOP/s per device, ``(bf16, fp32)`` where fp32 is the
#: TF32 tensor-core rate (what PyTorch uses for fp32 matmuls with TF32 allowed). Matched against
#: ``torch.cuda.get_device_name()``: the first key that is a substring wins, so the more specific
#: names come first. Sources: NVIDIA A100/H100/H200/L4/L40S/A10/B200 and AMD MI300X data sheets.
PEAK_FLOPS = (
    ("H100 PCIe", (756e12, 378e12)),
    ("H100 NVL", (835e12, 417.5e12)),
    ("H100", (989e12, 494.5e12)),  # SXM
    ("H200", (989e12, 494.5e12)),
    ("GH200", (989e12, 494.5e12)),
    ("B200", (2250e12, 1100e12)),
    ("A100", (312e12, 156e12)),
    ("A800", (312e12, 156e12)),
    ("L40S", (362e12, 183e12)),
    ("L4", (121e12, 60e12)),
    ("A10G", (70e12, 35e12)),
    ("A10", (125e12, 62.5e12)),
    ("MI300X", (1307e12, 653.7e12)),
)


def known_peak_flops(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """Peak dense FLOP/s of the accelerator called ``device_name`` for ``dtype`` (bf16/fp16 -> the
    bf16 column, else the TF32 column) from :data:`PEAK_FLOPS`, or None for an unknown device."""
    for key, (bf16, fp32) in PEAK_FLOPS:
        if key in device_name:
            return bf16 if dtype in (torch.bfloat16, torch.float16) else fp32
    return None


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
        for summary in hp_summary(clean, metrics):
            self.writer.file_writer.add_summary(summary)

    # ``SummaryWriter.add_hparams`` would write the summaries to a second writer in a sub-directory
    # and log ``metrics`` as scalars at step 0 (duplicate, NaN ``val/*`` points); so the summaries
    # go to this writer's own event file through its public ``file_writer`` attribute (opened in
    # ``SummaryWriter.__init__``), the one place the writer's structure is relied on.

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
