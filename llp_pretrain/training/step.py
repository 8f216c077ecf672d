"""One optimizer step: forward and backward over ``train.grad_accum_steps`` micro-batches, then
``engine.step()``.

A non-finite loss on any rank skips the whole step on every rank (no parameter or optimizer-moment
update; the LR schedule advances): the ranks agree before the last backward, the last micro-batch's
loss is multiplied by 0 (DeepSpeed's hooks and bookkeeping still run) and
:func:`~llp_pretrain.training.optim.discard_step` makes ``engine.step()`` a no-op.
"""
from __future__ import annotations

import math
import time

from .distributed import all_reduce
from .loss import compute_loss
from .metrics import StepOutcome
from .optim import discard_step, grad_norm

__all__ = ["train_step"]


def train_step(engine, loader, sp, d, accum: int, stage: int, precision: str) -> StepOutcome:
    """Run one optimizer step on ``accum`` micro-batches drawn from ``loader`` (an iterator of
    ``{"tokens": (B, N + 1)}``). Collective: every rank calls it. Returns the :class:`StepOutcome`
    (its ``time`` covers the whole step)."""
    t0 = time.perf_counter()
    wait, loss_acc, bad = 0.0, 0.0, 0.0
    bad_any, gn, lr = 0.0, None, float("nan")
    for micro in range(accum):
        tw = time.perf_counter()
        batch = next(loader)
        wait += time.perf_counter() - tw
        tokens = batch["tokens"].to(d.device, non_blocking=True)
        loss, _, _ = compute_loss(engine, tokens, sp)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            bad = 1.0
        else:
            loss_acc += lv
        last = micro == accum - 1
        if last:
            # agree on skipping before the optimizer step (all ranks, every step)
            bad_any, = all_reduce([bad], op="max", device=d.reduce_device)
            if bad_any:
                loss = loss * 0.0  # keeps DeepSpeed's hooks/bookkeeping; grads are discarded below
        engine.backward(loss)
        if last:
            if bad_any:
                discard_step(engine, stage if precision == "fp32" else -1)
                gn = float("nan")
            elif stage == 0:  # DeepSpeed reports no norm for ZeRO-0: reduced grads are local
                gn = grad_norm(engine.module)
            lr = engine.get_lr()[0]  # the LR this optimizer step uses
        engine.step()
    return StepOutcome(loss=None if bad_any else loss_acc / accum, skipped=bool(bad_any), lr=lr, grad_norm=gn,
                       time=time.perf_counter() - t0, wait=wait)
