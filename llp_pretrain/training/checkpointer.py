"""Save and resume: where a run starts, the layout check, DeepSpeed checkpoints plus our metadata.

A checkpoint tag directory holds DeepSpeed's files, one RNG file per rank, ``config.resolved.yaml``,
``ds_config.json`` and ``run_meta.json`` (written last by ``checkpoint.finalize_save``; only then is
the tag complete and ``latest`` moved to it). Contract: ``docs/training.md`` (Checkpoints and resume).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from llp_pretrain import checkpoint as ckpt
from llp_pretrain.config import RunConfig, dump_yaml
from llp_pretrain.layout import ParallelLayout
from llp_pretrain.run_identity import check_resume_identity, start_point
from llp_pretrain.schedule import resumed_schedule, schedule_meta

from .universal import describe_rng, needs_universal, reseed_for_layout

__all__ = ["layout_meta", "check_resume_world", "check_resume_layout", "StartPoint", "resolve_start", "Checkpointer"]


# per-parameter-group optimizer settings that come from the config (training/optim.py), never from a checkpoint
GROUP_SETTINGS = ("weight_decay", "betas", "eps", "amsgrad", "maximize")


def repair_optimizer_after_load(optimizer, settings: List[Dict[str, Any]]) -> None:
    """Undo two things DeepSpeed's ZeRO-3 universal load does (``load_hp_checkpoint_state_from_
    checkpoint_dir_stage3``) that would make the continued run silently differ from the
    uninterrupted one: it copies the first parameter group's hyperparameters into every group
    (weight decay on biases and norms), and it gives every partition's Adam state the *same* ``step``
    tensor, which the optimizer then increments once per group per step (wrong bias correction).
    ``settings``: per group, the :data:`GROUP_SETTINGS` read before the load (they belong to the
    config, not the checkpoint). Harmless for loads that do neither."""
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def layout_meta(cfg: RunConfig, d) -> Dict[str, Any]:
    """The parts of the process layout and data order an exact resume depends on."""
    return {"world_size": d.world_size, "data_parallel_size": d.dp_size, "sequence_parallel_size": d.sp_size,
            "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
            "num_workers": cfg.data.num_workers, "seed": cfg.train.seed, "shuffle_buffer": cfg.data.shuffle_buffer,
            "global_batch_size": cfg.train.global_batch_size, "virtual_readers": cfg.data.virtual_readers}


def _global_batch(layout: Dict[str, Any]) -> Optional[int]:
    if isinstance(layout.get("global_batch_size"), int):
        return layout["global_batch_size"]
    try:
        return int(layout["micro_batch_size"]) * int(layout["grad_accum_steps"]) * int(layout["data_parallel_size"])
    except (KeyError, TypeError, ValueError):
        return None


def check_resume_world(meta: Dict[str, Any], world_size: int, sequence_parallel_size: int, where: str,
                       global_batch_size: Optional[int] = None) -> None:
    """Fail (``ValueError``) when a checkpoint cannot continue on ``world_size`` processes with
    ``sequence_parallel_size``: another global batch size (samples per optimizer step) than
    ``global_batch_size``. Another data-parallel x sequence-parallel layout is allowed (ZeRO states
    are converted, ``training/universal.py``). Used by the trainer and by the launchers' pre-flight
    check (``launch_utils layout``), before any start-up."""
    old = meta.get("layout", {})
    old_gb = _global_batch(old)
    if global_batch_size is not None and old_gb is not None and old_gb != global_batch_size:
        dp = ParallelLayout(world_size, sequence_parallel_size).dp_size
        raise ValueError(
            f"{where} was trained with global_batch_size={old_gb} (micro_batch_size {old.get('micro_batch_size')} x "
            f"grad_accum_steps {old.get('grad_accum_steps')} x data_parallel_size {old.get('data_parallel_size')}); "
            f"this run has {global_batch_size}. The step counter, LR schedule and data position count optimizer "
            f"steps of {old_gb} samples, so the run cannot continue with another global batch size. Resume with "
            f"--set train.global_batch_size={old_gb} (with data_parallel_size {dp} it needs micro_batch_size x "
            f"grad_accum_steps = {old_gb / dp:g}), or start a new run with train.init_from.")


def check_resume_layout(meta: Dict[str, Any], cfg: RunConfig, d, where: str) -> None:
    """Fail up front (``ValueError``) when a checkpoint's layout differs from this run's in a way
    that breaks exact resume (:func:`check_resume_world`, then the settings the data position
    depends on; micro_batch_size and grad_accum_steps may change with the data-parallel size),
    saying how to proceed."""
    check_resume_world(meta, d.world_size, d.sp_size, where, cfg.train.global_batch_size)
    old, new = meta.get("layout", {}), layout_meta(cfg, d)
    if "virtual_readers" not in old:
        raise ValueError(f"{where} was written by a loader whose sample order depended on the process layout; its "
                         "data position cannot be continued exactly: `llp-pretrain export` it and start a new run with "
                         "train.init_from")
    # the global sample order depends on these only (llp_pretrain.data_order); num_workers and the micro batch are free
    diffs = [k for k in ("global_batch_size", "virtual_readers", "seed", "shuffle_buffer") if old.get(k) != new[k]]
    if diffs:
        raise ValueError(f"{where} was written with " + ", ".join(f"{k}={old.get(k)}" for k in diffs)
                         + "; this run has " + ", ".join(f"{k}={new[k]}" for k in diffs)
                         + ". The data position depends on them: resume with the checkpoint's values "
                         + "(see its config.resolved.yaml) or start a new run with train.init_from.")


@dataclass
class StartPoint:
    """Where a run starts: ``where`` = ``(checkpoints dir, tag)`` or None for a fresh start, its
    ``meta`` (``run_meta.json``), ``data_start`` (the step the current dataset was first read at),
    the LR function ``lr_fn(step)`` and the schedule ``lr_anchor`` recorded in the next checkpoints.
    ``universal``: the ZeRO states need a universal checkpoint (another world size); ``load_from``:
    ``(dir, tag)`` DeepSpeed loads (``where``, or the converted copy set by
    ``universal.prepare_universal``); ``layout_changed``: another dp x sp layout (RNG states derived)."""

    where: Optional[Tuple[Path, str]]
    meta: Optional[Dict[str, Any]]
    data_start: int
    lr_fn: Callable[[int], float]
    lr_anchor: Optional[Dict[str, float]]
    universal: bool = False
    load_from: Optional[Tuple[Path, str]] = None
    layout_changed: bool = False

    @property
    def path(self) -> str:
        return str(self.where[0] / self.where[1]) if self.where else ""

    def already_done(self, max_steps: int) -> bool:
        """True for a resumed run already at (or past) ``max_steps``: there is nothing to train."""
        return self.meta is not None and int(self.meta["step"]) >= max_steps

    def step(self) -> int:
        """The checkpoint's optimizer step (0 on a fresh start)."""
        return int(self.meta["step"]) if self.meta else 0


def resolve_start(cfg: RunConfig, d, resume: Optional[str], overwrite: bool, resolved: Dict[str, Any],
                  hashes: Dict[str, Optional[str]]) -> StartPoint:
    """Every check that can refuse the start, before anything is written or built: the run directory
    (reuse, ``--resume``/``--overwrite``), and on resume the layout, model, tokenizer and data identity,
    the checkpoint's files (loadable without code) and the LR schedule. Raises ``ValueError`` /
    ``FileNotFoundError`` / ``UntrustedCheckpointError`` with the way out."""
    t = cfg.train
    where = start_point(Path(cfg.run.output_dir), resume, overwrite)
    meta, data_start, universal, changed = None, 0, False, False
    if where is not None:
        tag_dir = where[0] / where[1]
        meta = ckpt.read_meta(tag_dir)
        check_resume_layout(meta, cfg, d, str(tag_dir))
        data_start = check_resume_identity(meta, resolved["model"], hashes, t.allow_data_change, str(tag_dir))
        ckpt.check_loadable(tag_dir)
        universal = needs_universal(meta, d.world_size, tag_dir)
        old = meta.get("layout", {})
        changed = (old.get("data_parallel_size"), old.get("sequence_parallel_size")) != (d.dp_size, d.sp_size)
    lr_fn, lr_anchor = resumed_schedule(t, meta, str(where[0] / where[1]) if where else "")
    return StartPoint(where, meta, data_start, lr_fn, lr_anchor, universal, where, changed)


class Checkpointer:
    """Saves the run's checkpoints and loads the one it resumes from (collectives: all ranks call).

    Args:
        cfg: the run config; ``d``: the ``DistInfo``; ``engine``: the DeepSpeed engine;
        start: the :class:`StartPoint` (its ``data_start`` and ``lr_anchor`` go into every save);
        resolved, hashes: recorded in ``config.resolved.yaml`` / ``run_meta.json``;
        console: prints a line on rank 0.
    A full disk during a save raises ``checkpoint.DiskFullError`` (one line; ``latest`` unchanged)."""

    def __init__(self, cfg: RunConfig, d, engine, start: StartPoint, resolved: Dict[str, Any],
                 hashes: Dict[str, Optional[str]], console: Callable[[str], None]):
        self.cfg, self.d, self.engine, self.start = cfg, d, engine, start
        self.resolved, self.hashes, self.console = resolved, hashes, console
        self.ckpt_dir = Path(cfg.run.output_dir) / "checkpoints"
        self.stage = int(cfg.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.save = ckpt.reporting_full_disk(self._save, self.ckpt_dir)
        self._skipped = 0

    def load(self) -> Tuple[int, int]:
        """Load the start point's DeepSpeed state (weights, optimizer, LR scheduler); returns
        ``(step, skipped_steps)``; ``(0, 0)`` on a fresh start. RNG states are restored separately
        (:meth:`restore_rng`), last."""
        if self.start.where is None:
            return 0, 0
        where = self.start.load_from or self.start.where
        groups = self.engine.optimizer.param_groups
        settings = [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in groups]
        with ckpt.weights_only_loads():  # DeepSpeed's torch.load calls cannot unpickle code
            load_path, _ = self.engine.load_checkpoint(str(where[0]), tag=where[1], load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        repair_optimizer_after_load(self.engine.optimizer, settings)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.start.path}")
        meta = self.start.meta
        if self.d.rank == 0:
            print(f"[llp-pretrain] resumed from {self.start.path} at step {int(meta['step'])}", flush=True)
        return int(meta["step"]), int(meta.get("skipped_steps", 0))

    def restore_rng(self) -> None:
        """Restore this rank's RNG states of the resumed checkpoint (no-op on a fresh start); on
        another layout derive them from ``(train.seed, step, rank)`` instead (said on rank 0)."""
        if self.start.where is None:
            return
        if self.start.layout_changed:
            reseed_for_layout(self.cfg.train.seed, self.start.step(), self.d.rank)
            if self.d.rank == 0:
                print(describe_rng(self.start.meta, self.d), flush=True)
            return
        ckpt.load_rank_rng(self.start.where[0] / self.start.where[1], self.d.rank)

    def save_step(self, step: int, skipped_steps: int) -> None:
        """Save a checkpoint of optimizer step ``step``."""
        self._skipped = skipped_steps
        self.save(step)

    def _save(self, step: int) -> None:
        import torch.distributed as dist

        cfg, d = self.cfg, self.d
        tag = ckpt.tag_for(step)
        client = {"step": step, "layout": layout_meta(cfg, d)}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        tag_dir = self.ckpt_dir / tag
        ckpt.save_rank_rng(tag_dir, d.rank)
        dist.barrier()
        if d.rank == 0:
            dump_yaml(self.resolved, tag_dir / "config.resolved.yaml")
            ckpt.write_json_atomic(tag_dir / "ds_config.json", cfg.ds_config)
            ckpt.finalize_save(self.ckpt_dir, tag, self._meta(step), cfg.train.keep_checkpoints)
        dist.barrier()
        self.console(f"[llp-pretrain] saved checkpoint {tag_dir}")

    def _meta(self, step: int) -> Dict[str, Any]:
        t = self.cfg.train
        return {"step": step, "consumed_batches_per_rank": step * t.grad_accum_steps,
                "consumed_samples": step * t.global_batch_size, "skipped_steps": self._skipped,
                "layout": layout_meta(self.cfg, self.d), "zero_stage": self.stage, "model": self.resolved["model"],
                "hashes": self.hashes, "data_start_step": self.start.data_start,
                "schedule": schedule_meta(t, self.start.lr_anchor), "time": time.time()}
