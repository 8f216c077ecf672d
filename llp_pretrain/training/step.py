"""One optimizer step: forward and backward over ``train.grad_accum_steps`` micro-batches, then
``engine.step()``, with one host synchronisation and one small collective per optimizer step.

The micro-batches' losses are summed on the device, and whether any was non-finite is kept on the
device too. Before the last backward, one all-reduce (SUM, float64, on the GPU under NCCL) of
``[non-finite flag, this rank's mean loss, *flags]`` gives every rank the same answer to: skip this
step? what was the loss (summed over ranks)? and the caller's per-step agreements (signal, time
limit). A non-finite loss on any rank skips the whole step on every rank (no parameter or
optimizer-moment update; the LR schedule advances): the last micro-batch's loss is multiplied by 0
(DeepSpeed's hooks and bookkeeping still run) and :func:`~llp_pretrain.training.optim.discard_step`
makes ``engine.step()`` a no-op.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .loss import compute_loss
from .metrics import StepOutcome
from .optim import discard_step, grad_norm

__all__ = ["train_step", "agree"]


def agree(local: torch.Tensor) -> list:
    """All-reduce (SUM) a small float64 vector over the default group and read it on the host (the
    step's one synchronisation). A collective: every rank calls it with the same length."""
    import torch.distributed as dist

    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return local.tolist()


def train_step(engine, loader, sp, d, accum: int, stage: int, precision: str,
               flags: Callable[[], Sequence[float]] = lambda: ()) -> StepOutcome:
    """Run one optimizer step on ``accum`` micro-batches drawn from ``loader`` (an iterator of
    ``{"tokens": (B, N + 1)}``). ``flags()`` gives this rank's per-step flags (0.0/1.0) to agree on;
    their sums over all ranks come back in ``StepOutcome.flags``. Collective: every rank calls it.
    Returns the :class:`StepOutcome` (its ``loss`` is the mean over ranks, its ``time`` covers the
    whole step)."""
    t0 = time.perf_counter()
    wait = 0.0
    loss_acc = torch.zeros((), dtype=torch.float64, device=d.device)
    bad = torch.zeros((), dtype=torch.float64, device=d.device)
    for micro in range(accum):
        tw = time.perf_counter()
        batch = next(loader)
        wait += time.perf_counter() - tw
        tokens = batch["tokens"].to(d.device, non_blocking=True)
        loss, _, _ = compute_loss(engine, tokens, sp)
        lv = loss.detach().to(torch.float64)
        finite = torch.isfinite(lv)
        bad = torch.maximum(bad, (~finite).to(torch.float64))
        loss_acc = loss_acc + torch.where(finite, lv, torch.zeros_like(lv))
        if micro == accum - 1:
            # agree on skipping before the optimizer step (all ranks, every step)
            local = torch.stack([bad, loss_acc / accum, *[torch.tensor(float(f), dtype=torch.float64,
                                                                        device=d.device) for f in flags()]])
            agreed = agree(local)  # on the GPU under NCCL, on the CPU under gloo
            if agreed[0]:
                loss = loss * 0.0  # keeps DeepSpeed's hooks/bookkeeping; grads are discarded below
        engine.backward(loss)
        if micro == accum - 1:
            gn = None
            if agreed[0]:
                discard_step(engine, stage if precision == "fp32" else -1)
                gn = float("nan")
            elif stage == 0:  # DeepSpeed reports no norm for ZeRO-0: reduced grads are local
                gn = grad_norm(engine.module)  # a device tensor; read on the host only when logged
            lr = engine.get_lr()[0]  # the LR this optimizer step uses
        engine.step()
    skipped = bool(agreed[0])
    return StepOutcome(loss=None if skipped else agreed[1] / d.world_size, skipped=skipped, lr=lr, grad_norm=gn,
                       time=time.perf_counter() - t0, wait=wait, flags=tuple(agreed[2:]))
