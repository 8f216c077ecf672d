"""The stop decision: SIGTERM/SIGUSR1 on any rank or the time limit, agreed on by all ranks.

A signal only sets a flag; the loop finishes the optimizer step, all ranks agree on the step,
save a checkpoint and exit with status 0 (``docs/training.md``).
"""
from __future__ import annotations

import signal
import time
from typing import Optional, Sequence, Tuple

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

    Each step, :meth:`local_flags` (signal received here, time limit passed here) travel in the
    step's one collective (``step.train_step``); :meth:`agree` takes their sums over all ranks.
    A callback may :meth:`request` a stop that all ranks request alike.

    Args:
        time_limit_minutes: wall-clock budget of this process's training (None: none).
    """

    def __init__(self, time_limit_minutes: Optional[float]):
        self.signals = Signals()
        self.time_limit_minutes = time_limit_minutes
        self.t_start = time.time()
        self.reason: Optional[str] = None

    def over_time(self) -> bool:
        return self.time_limit_minutes is not None and (time.time() - self.t_start) > 60 * self.time_limit_minutes

    def local_flags(self) -> Tuple[float, float]:
        return float(self.signals.flag), float(self.over_time())

    def agree(self, summed_flags: Sequence[float]) -> None:
        """Record the agreed decision from :meth:`local_flags` summed over all ranks."""
        stop_sig, stop_time = summed_flags
        if self.reason is None:
            self.reason = "signal" if stop_sig else ("time_limit" if stop_time else None)

    def request(self, reason: str) -> None:
        """Stop after this step for ``reason`` (every rank must request the same)."""
        self.reason = self.reason or reason

    def check(self) -> Optional[str]:
        """``"signal"``, ``"time_limit"`` or None (continue); no communication."""
        return self.reason

    def close(self) -> None:
        self.signals.restore()
