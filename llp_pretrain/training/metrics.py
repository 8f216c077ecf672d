"""Training metrics: a window of optimizer steps, averaged over all ranks at each log interval.

Logged (TensorBoard and one console line, rank 0): ``train/loss`` (mean over the window's
non-skipped steps and all ranks), ``train/lr``, ``train/grad_norm``, ``train/tokens_per_sec``
(global), ``train/mfu`` (model FLOPs utilisation: ``flops_per_token * tokens/s / (peak * world)``),
``train/peak_flops`` (the per-process peak in use; ``training.peak``),
``train/step_time`` (seconds), ``train/data_wait_fraction``, ``train/memory_gb``,
``train/skipped_steps``; with ``data.on_corrupt: skip`` also ``data/skipped_samples`` (corrupt samples
the loaders of all data-parallel ranks skipped since this process started; a bad sample counts each
time it is read, once per epoch; :class:`SkipTally`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llp_pretrain.monitor import Monitor, format_eta, memory_gb

__all__ = ["StepOutcome", "MetricsLogger", "SkipTally"]


@dataclass
class StepOutcome:
    """What one optimizer step reports: mean ``loss`` over its micro-batches (nats/token; None when the
    step was skipped; averaged over all ranks), whether it was ``skipped`` (non-finite loss on some
    rank), the ``lr`` it applied, the ZeRO-0 ``grad_norm`` (a 0-dim tensor, NaN when skipped; None for
    ZeRO 1-3: DeepSpeed reports it), seconds spent: ``time`` in total and ``wait`` for data, and the
    caller's per-step ``flags`` summed over all ranks."""

    loss: Optional[float]
    skipped: bool
    lr: float
    grad_norm: Optional[float]
    time: float = 0.0
    wait: float = 0.0
    flags: tuple = ()


class SkipTally:
    """Wraps the training loader's iterator: passes every batch through and keeps the latest count of
    corrupt samples skipped (``data.on_corrupt: skip``) of each logical loader worker; a batch carries
    its worker's running count as ``"skipped"`` and the worker as ``"worker"``. :attr:`local` is this
    rank's total."""

    def __init__(self, batches):
        self.batches = batches
        self.by_worker: dict = {}

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        if "skipped" in batch:
            self.by_worker[batch.get("worker", 0)] = int(batch["skipped"])
        return batch

    @property
    def local(self) -> int:
        return sum(self.by_worker.values())

    @property
    def step_keys(self):
        """The wrapped loader's keys of the last step (``data.StepBatches.step_keys``)."""
        return self.batches.step_keys


class MetricsLogger:
    """Accumulates :class:`StepOutcome` s and logs their window every ``train.log_interval`` steps.

    Args:
        cfg: the run config; ``d``: the ``DistInfo``; ``monitor``: the :class:`Monitor`;
        peak: the per-process :class:`~llp_pretrain.training.peak.Peak` (the MFU denominator);
        flops_per_token: training FLOPs per token of the model at ``seq_len``.
    """

    def __init__(self, cfg, d, monitor: Monitor, peak, flops_per_token: float):
        self.cfg, self.d, self.monitor = cfg, d, monitor
        self.peak, self.flops_tok = peak, flops_per_token
        self.last_loss: Optional[float] = None
        self._reset()

    def _reset(self) -> None:
        self.win = {"time": 0.0, "wait": 0.0, "steps": 0, "loss": 0.0, "loss_steps": 0}

    def record(self, out: StepOutcome) -> None:
        if not out.skipped:
            self.win["loss"] += out.loss
            self.win["loss_steps"] += 1
        self.win["time"] += out.time
        self.win["wait"] += out.wait
        self.win["steps"] += 1

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return step % t.log_interval == 0 or step == t.max_steps

    def log(self, step: int, out: StepOutcome, grad_norm, skipped_total: int,
            skipped_samples: Optional[int] = None) -> None:
        """Log the window ending at ``step`` (every rank calls it; no collective: the step losses are
        already averaged over ranks, ``skipped_samples`` is already summed) and start a new one."""
        t, win = self.cfg.train, self.win
        mean_loss = win["loss"] / win["loss_steps"] if win["loss_steps"] else float("nan")
        self.last_loss = mean_loss
        step_time = win["time"] / win["steps"]
        tok_s = t.global_batch_size * self.cfg.model.seq_len / step_time
        mfu = self._mfu(self.flops_tok * tok_s / self.d.world_size)
        gn = float(grad_norm) if grad_norm is not None else None
        self.monitor.scalars(step, {
            "train/loss": mean_loss, "train/lr": out.lr, "train/grad_norm": gn,
            "train/tokens_per_sec": tok_s, "train/mfu": mfu, "train/peak_flops": self.peak.flops,
            "train/step_time": step_time,
            "train/data_wait_fraction": win["wait"] / max(win["time"], 1e-12),
            "train/memory_gb": memory_gb(), "train/skipped_steps": skipped_total,
            "data/skipped_samples": skipped_samples,
        })
        eta = step_time * (t.max_steps - step)
        self.monitor.console(f"step {step:>7d}/{t.max_steps} | loss {mean_loss:.4f} | lr {out.lr:.3e} | "
                             f"grad_norm {gn if gn is not None else float('nan'):.3f} | {tok_s:,.0f} tok/s | "
                             f"mfu {100 * mfu:.1f}% | eta {format_eta(eta)}"
                             + (f" | skipped samples {skipped_samples}" if skipped_samples else ""))
        self.monitor.flush()
        self._reset()

    def _mfu(self, achieved: float) -> float:
        """``achieved / peak`` for the per-process model FLOP/s ``achieved``, never above 1: a peak that
        the model beats is wrong (a start-up measurement slowed by other load is only a lower bound; a
        configured or tabled value may be mistaken), so the peak in use becomes ``achieved`` and a
        console line says so. ``train/peak_flops`` records the value used at every log."""
        if achieved > self.peak.flops:
            hint = ("the start-up measurement was slowed by other load" if self.peak.measured
                    else f"{self.peak.source} is too low")
            self.monitor.console(f"[llp-pretrain] warning: the model runs at {achieved / 1e9:.1f} GFLOP/s per process, "
                                 f"above the peak in use ({self.peak.flops / 1e9:.1f} GFLOP/s: {hint}); MFU is now "
                                 "relative to the achieved rate (set train.peak_flops to the device's peak FLOP/s)")
            self.peak.flops = achieved
        return achieved / self.peak.flops
