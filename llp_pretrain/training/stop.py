"""The stop decision: SIGTERM/SIGUSR1 on any rank or the time limit, agreed on by all ranks.

A signal only sets a flag; the loop finishes the optimizer step, all ranks agree on the step,
save a checkpoint and exit with status 0 (``docs/training.md``).
"""
from __future__ import annotations

import signal
import time
from typing import Optional

from .distributed import all_reduce

__all__ = ["Signals", "StopDecision"]


class Signals:
    """Sets a flag on SIGTERM/SIGUSR1; :meth:`restore` puts the previous handlers back."""

    def __init__(self):
        self.flag = False
        self.signum = None
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.flag = True
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class StopDecision:
    """Whether the loop stops after this optimizer step, the same answer on every rank.

    Args:
        time_limit_minutes: wall-clock budget of this process's training (None: none).
        reduce_device: device of the agreement's tensor (the GPU under NCCL, None for CPU/gloo).
    """

    def __init__(self, time_limit_minutes: Optional[float], reduce_device=None):
        self.signals = Signals()
        self.time_limit_minutes = time_limit_minutes
        self.reduce_device = reduce_device
        self.t_start = time.time()

    def over_time(self) -> bool:
        return self.time_limit_minutes is not None and (time.time() - self.t_start) > 60 * self.time_limit_minutes

    def check(self) -> Optional[str]:
        """``"signal"``, ``"time_limit"`` or None (continue). Collective: every rank calls it once per step."""
        stop_sig, stop_time = all_reduce([float(self.signals.flag), float(self.over_time())], op="max",
                                         device=self.reduce_device)
        if stop_sig:
            return "signal"
        return "time_limit" if stop_time else None

    def close(self) -> None:
        self.signals.restore()
