"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr``, continuous across resumes.

A run resumed with a larger (or smaller) ``train.max_steps`` keeps its LR continuous: from the resume
step ``s`` on, the cosine restarts from the LR the run had at ``s`` and decays to ``min_lr`` at the
new ``max_steps`` (an *anchor* ``{"step": s, "lr": lr_s}``, kept in ``run_meta.json`` for later
resumes). Without it, the closed form would jump (re-warm) at ``s``. Changing ``lr``, ``min_lr`` or
``warmup_steps`` on resume is refused: there is no single continuous answer for those.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["lr_at", "resumed_schedule", "schedule_meta"]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from ``lr/warmup_steps`` to
    ``lr`` over ``warmup_steps`` steps, then cosine decay to ``min_lr`` at ``max_steps``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _cosine_from(step: int, anchor_step: int, anchor_lr: float, min_lr: float, max_steps: int) -> float:
    span = max(1, max_steps - anchor_step)
    progress = min(1.0, max(0.0, (step - anchor_step) / span))
    return min_lr + 0.5 * (anchor_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_meta(train, anchor: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """What ``run_meta.json`` records of the schedule (read back by :func:`resumed_schedule`)."""
    return {"lr": train.lr, "min_lr": train.min_lr, "warmup_steps": train.warmup_steps,
            "max_steps": train.max_steps, "anchor": anchor}


def _make(train, anchor: Optional[Dict[str, float]]) -> Callable[[int], float]:
    if anchor is None:
        return lambda s: lr_at(s, train.lr, train.min_lr, train.warmup_steps, train.max_steps)
    a_step, a_lr = int(anchor["step"]), float(anchor["lr"])
    return lambda s: (lr_at(s, train.lr, train.min_lr, train.warmup_steps, train.max_steps) if s < a_step
                      else _cosine_from(s, a_step, a_lr, train.min_lr, train.max_steps))


def resumed_schedule(train, meta: Optional[Dict[str, Any]], where: str = "the checkpoint"
                     ) -> Tuple[Callable[[int], float], Optional[Dict[str, float]]]:
    """``(lr_fn, anchor)``: the LR of each 0-based optimizer step for a fresh run (``meta`` None) or one
    resumed from a checkpoint's ``run_meta.json``.

    Raises ``ValueError`` when ``lr``, ``min_lr`` or ``warmup_steps`` differ from the checkpoint's."""
    old = (meta or {}).get("schedule")
    if old is None:
        return _make(train, None), None
    diffs = [f"train.{k}: {old[k]} -> {getattr(train, k)}" for k in ("lr", "min_lr", "warmup_steps")
             if old.get(k) != getattr(train, k)]
    if diffs:
        raise ValueError(f"{where} was trained with another LR schedule ({', '.join(diffs)}); resume with the "
                         "checkpoint's values (only train.max_steps may change: the cosine then continues from "
                         "the current LR), or start a new run with train.init_from")
    anchor = old.get("anchor")
    step = int(meta["step"])
    if old.get("max_steps") != train.max_steps and step >= train.warmup_steps:
        previous = _make(_Sched(old), anchor)
        anchor = {"step": step, "lr": previous(step)}
    return _make(train, anchor), anchor


class _Sched:
    """The schedule fields of a checkpoint's ``run_meta.json`` as attributes (like ``TrainConfig``)."""

    def __init__(self, d: Dict[str, Any]):
        self.lr, self.min_lr = float(d["lr"]), float(d["min_lr"])
        self.warmup_steps, self.max_steps = int(d["warmup_steps"]), int(d["max_steps"])
