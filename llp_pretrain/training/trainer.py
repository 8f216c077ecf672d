"""The training loop: :class:`Trainer` builds a run (``__init__``) and trains it (:meth:`Trainer.train`).

Components, each in its own module of this package: ``distributed`` (process group), ``checkpointer``
(start point, save, resume), ``setup`` (run directory, model, DeepSpeed engine), ``step`` (one
optimizer step over its micro-batches), ``evaluation`` (validation, samples), ``stop`` (signals,
time limit), ``metrics`` (logging), ``callbacks`` (hooks outside the loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from llp_pretrain.config import RunConfig, resolve_tokenizer, resolved_precision
from llp_pretrain.data import TrainStream, make_train_loader, train_sources
from llp_pretrain.data_order import SourceTally
from llp_pretrain.monitor import Monitor
from llp_pretrain.run_identity import run_hashes

from . import callbacks as _callbacks
from .checkpointer import Checkpointer, resolve_start
from .consumed import ConsumedLog
from .distributed import all_reduce, setup_distributed
from .evaluation import Evaluator, log_val, sample_text
from .metrics import MetricsLogger, SkipTally, StepOutcome
from .peak import Peak, resolve_peak
from .setup import Built, build_engine, prepare_run_dir
from .step import train_step
from .stop import StopDecision
from .universal import prepare_universal

__all__ = ["Trainer", "TrainResult", "train"]


@dataclass
class TrainResult:
    """Outcome of :func:`train`: final ``step``, last logged ``loss``, ``stopped_by``
    (``max_steps``/``signal``/``time_limit``), ``skipped_steps``, last ``val`` metrics, run dir."""

    step: int
    loss: Optional[float]
    stopped_by: str
    skipped_steps: int
    val: Optional[Dict[str, float]]
    run_dir: str


class Trainer:
    """One training job described by a validated :class:`RunConfig` (see ``docs/training.md``).

    ``resume``: None (fresh start; refused when the run directory already holds checkpoints),
    ``"auto"`` or a checkpoint path. ``overwrite``: delete the run directory's checkpoints and
    TensorBoard events first. ``callbacks``: objects with ``on_step_end(trainer)`` (plus those
    registered with :func:`llp_pretrain.training.callbacks.register`).

    Raises ``ValueError`` for a reused run directory, a layout, model or data mismatch on resume
    (before anything is built)."""

    def __init__(self, cfg: RunConfig, resume: Optional[str] = None, overwrite: bool = False,
                 callbacks: Iterable[Any] = ()):
        self.cfg, t = cfg, cfg.train
        self.d = setup_distributed(cfg.parallel.sequence_parallel_size)
        self.run_dir = Path(cfg.run.output_dir)
        self.tokenizer_path = resolve_tokenizer(cfg.data, cfg.manifest)
        self.hashes = run_hashes(cfg, self.tokenizer_path)
        self.resolved = cfg.to_dict()
        # every check that can refuse the start runs before anything is written or built
        self.start = resolve_start(cfg, self.d, resume, overwrite, self.resolved, self.hashes)
        self.callbacks = [*_callbacks.registered(), *callbacks]
        self.step, self.skipped_total = self.start.step(), int((self.start.meta or {}).get("skipped_steps", 0))
        self.stopped_by, self.val = "max_steps", None
        self.engine = self.loader = self.monitor = self.stop = self.consumed = self.tally = None
        if self.start.already_done(t.max_steps):
            return
        try:
            self._build(overwrite)
        except BaseException:
            self.close()
            raise

    def _build(self, overwrite: bool) -> None:
        cfg, d = self.cfg, self.d
        prepare_run_dir(cfg, d, overwrite, self.resolved, self.hashes, self.tokenizer_path)
        prepare_universal(self.start, d, console=lambda line: print(line, flush=True))  # another world size
        built = build_engine(cfg, d, self.start)
        self.engine, self.sp, self.stage = built.engine, built.sp, built.stage
        self.checkpointer = Checkpointer(cfg, d, self.engine, self.start, self.resolved, self.hashes,
                                         console=lambda line: self.monitor.console(line))
        self.step, self.skipped_total = self.checkpointer.load()
        peak = self._start_loader()
        if cfg.data.log_consumed:
            self.consumed = ConsumedLog(self.run_dir, d.rank, d.world_size, self.step)
        # restored last: building the engine, measuring the peak and starting the loader's iterator all
        # draw from the global RNGs, so restoring earlier would shift dropout against the uninterrupted run
        self.checkpointer.restore_rng()
        self.monitor = self._open_monitor(built, peak)
        self.metrics = MetricsLogger(cfg, d, self.monitor, peak, built.flops_per_token)
        self.evaluator = Evaluator(cfg, d, self.engine, self.monitor.console)
        self.last_saved = self.step if self.start.where is not None else -1
        self.stop = StopDecision(cfg.train.time_limit_minutes)

    def _start_loader(self) -> Peak:
        """Open the training stream at this run's data position; returns the MFU peak."""
        cfg, d, t = self.cfg, self.d, self.cfg.train
        stream = TrainStream(train_sources(cfg), t.global_batch_size, t.micro_batch_size, d.dp_size, d.dp_rank,
                             cfg.data.num_workers, t.seed, cfg.data.shuffle_buffer,
                             start_step=self.step - self.start.data_start, virtual_readers=cfg.data.virtual_readers,
                             verify_checksums=cfg.data.verify_checksums, on_corrupt=cfg.data.on_corrupt)
        bf16_gpu = resolved_precision(t) == "bf16" and d.device.type == "cuda"
        # measured before the loader's workers start, so they do not compete with the measurement
        peak = resolve_peak(t.peak_flops, d, torch.bfloat16 if bf16_gpu else torch.float32)
        self.loader = SkipTally(iter(make_train_loader(stream)))
        self.tally = SourceTally(t.seed, stream.weights, stream.virtual_readers, stream.per_reader) \
            if cfg.data.sources and d.rank == 0 else None
        return peak

    def _open_monitor(self, built: Built, peak: Peak) -> Monitor:
        cfg, d, t = self.cfg, self.d, self.cfg.train
        prec = resolved_precision(t)
        # a fresh start hides events a killed earlier attempt left at any step (purge from step 1)
        monitor = Monitor(self.run_dir / "tensorboard", d.rank, purge_step=self.step + 1)
        if self.start.where is None:
            hp = {**{f"model.{k}": v for k, v in self.resolved["model"].items()},
                  **{f"train.{k}": v for k, v in self.resolved["train"].items()},
                  "zero_stage": built.stage, "world_size": d.world_size, "data_parallel_size": d.dp_size,
                  "sequence_parallel_size": d.sp_size, "params": built.n_params, "peak_flops": peak.flops,
                  "precision": prec}
            monitor.hparams(hp, {"val/loss": float("nan"), "val/ppl": float("nan")})
        monitor.console(f"[llp-pretrain] {cfg.model.variant} {built.n_params / 1e6:.2f}M params | world "
                        f"{d.world_size} (dp {d.dp_size} x sp {d.sp_size}) | ZeRO-{built.stage} | {prec} | global "
                        f"batch {t.global_batch_size} = {t.micro_batch_size} x {t.grad_accum_steps} x {d.dp_size} | "
                        f"seq_len {cfg.model.seq_len} | steps {self.step}->{t.max_steps} | MFU peak "
                        f"{peak.flops / 1e12:.3g} TFLOP/s per process ({peak.source})")
        return monitor

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train until ``train.max_steps``, a signal or the time limit; save; shut down (:meth:`close`).

        Raises ``FloatingPointError`` after ``train.max_nonfinite_steps`` non-finite steps in a row."""
        t = self.cfg.train
        if self.start.already_done(t.max_steps):
            if self.d.rank == 0:
                print(f"[llp-pretrain] {self.start.path} is already at step {self.step} >= train.max_steps "
                      f"{t.max_steps}: nothing to do", flush=True)
            return self.result(loss=None)
        nonfinite_run = 0
        try:
            for cb in self.callbacks:
                getattr(cb, "on_train_start", lambda trainer: None)(self)
            while self.step < t.max_steps:
                out = train_step(self.engine, self.loader, self.sp, self.d, t.grad_accum_steps, self.stage,
                                 resolved_precision(t), flags=self.stop.local_flags)
                self.step += 1
                if self.consumed is not None:
                    self.consumed.record(self.step, self.loader.step_keys)
                self.stop.agree(out.flags)
                nonfinite_run = self._count_nonfinite(out, nonfinite_run)
                self.metrics.record(out)
                if self.metrics.due(self.step):
                    gn = out.grad_norm if self.stage == 0 else self.engine.get_global_grad_norm()
                    self.metrics.log(self.step, out, gn, self.skipped_total, self.skipped_samples())
                    self._log_source_tokens()
                # periodic evaluation, unless the final one is only a few steps away
                if t.eval_interval and self.step % t.eval_interval == 0 and \
                        self.step <= t.max_steps - max(1, t.eval_interval // 4):
                    self.evaluate()
                if t.save_interval and self.step % t.save_interval == 0 and self.step < t.max_steps:
                    self.save()
                for cb in self.callbacks:
                    getattr(cb, "on_step_end", lambda trainer: None)(self)
                reason = self.stop.check()
                if reason:
                    self.stopped_by = reason
                    break
            if self.stopped_by in ("max_steps", "time_limit"):
                self.evaluate()
            if self.step != self.last_saved:
                self.save()
            if self.stopped_by == "signal":
                self.monitor.console(f"[llp-pretrain] stopped by signal at step {self.step} after saving; "
                                     "resume with --resume auto")
        finally:
            self.close()
        return self.result(loss=self.metrics.last_loss)

    def _log_source_tokens(self) -> None:
        """``train/tokens/<source>``: tokens trained on from each of ``data.sources`` since the data
        position 0 (all ranks; a function of the step, ``data_order.SourceTally``). Rank 0 only."""
        if self.tally is None:
            return
        samples = self.tally.at(self.step - self.start.data_start)
        names = [s.name for s in self.cfg.data.sources]
        self.monitor.scalars(self.step, {f"train/tokens/{n}": int(k) * self.cfg.model.seq_len
                                         for n, k in zip(names, samples)})

    def skipped_samples(self) -> Optional[int]:
        """Corrupt samples skipped so far by the loaders of all data-parallel ranks (``data.on_corrupt:
        skip``), None under ``fail``. A collective (every rank calls it at the same steps): the ranks of a
        sequence-parallel group read the same samples, so the sum is divided by its size."""
        if self.cfg.data.on_corrupt != "skip":
            return None
        total = all_reduce([float(self.loader.local)], device=self.d.reduce_device)[0]
        return int(round(total / self.d.sp_size))

    def _count_nonfinite(self, out: StepOutcome, run: int) -> int:
        """Count a skipped step; raise ``FloatingPointError`` after ``train.max_nonfinite_steps`` in a row."""
        if not out.skipped:
            return 0
        self.skipped_total += 1
        run += 1
        if run >= self.cfg.train.max_nonfinite_steps:
            raise FloatingPointError(
                f"{run} non-finite training steps in a row (last at step {self.step}); lower train.lr, raise "
                f"train.warmup_steps or check the data; resume from the last checkpoint with --resume auto")
        return run

    def evaluate(self) -> None:
        """Validation (and a text sample) at the current step, logged."""
        self.val = self.evaluator.run()
        log_val(self.monitor, self.step, self.val, sample_text(self.engine, self.cfg, self.tokenizer_path, self.stage))

    def save(self) -> None:
        """Checkpoint the current step (the consumed log is made durable first)."""
        if self.consumed is not None:
            self.consumed.flush()
        self.checkpointer.save_step(self.step, self.skipped_total)
        self.last_saved = self.step

    def result(self, loss: Optional[float]) -> TrainResult:
        return TrainResult(step=self.step, loss=loss, stopped_by=self.stopped_by, skipped_steps=self.skipped_total,
                           val=self.val, run_dir=str(self.run_dir))

    def close(self) -> None:
        """Shut down in a fixed order, on every exit path (finished, signal, time limit, an error):
        the loader's workers (dropping the only reference to its iterator stops them now, also while
        an error is on its way out), the consumed log (flushed), TensorBoard, DeepSpeed's engine
        (``engine.destroy()``), the signal handlers. The process group is destroyed last by whoever formed it
        (``training.distributed.destroy_process_group``; the CLI does). Idempotent."""
        self.loader = None
        if self.consumed is not None:
            self.consumed.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.destroy()
        if self.stop is not None:
            self.stop.close()


def train(cfg: RunConfig, resume: Optional[str] = None, overwrite: bool = False,
          callbacks: Iterable[Any] = ()) -> TrainResult:
    """Run (or resume) the training job ``cfg``: ``Trainer(cfg, resume, overwrite, callbacks).train()``.

    Raises ``ValueError`` for a reused run directory, a layout, model or data mismatch on resume
    (before anything is built), ``FloatingPointError`` after ``train.max_nonfinite_steps``
    non-finite steps in a row."""
    return Trainer(cfg, resume, overwrite, callbacks).train()
