"""Optimizer, LR scheduler and the non-finite-step skip.

AdamW with weight decay on matrices only (``torch.optim.AdamW``; ``DeepSpeedCPUAdam`` when the
DeepSpeed JSON offloads the optimizer) and a ``LambdaLR`` following ``llp_pretrain.schedule``
(linear warmup, cosine decay to ``min_lr``); DeepSpeed saves and restores both in checkpoints.
"""
from __future__ import annotations

from typing import Callable

import torch

from llp_pretrain.config import RunConfig, resolved_precision

__all__ = ["SkippableAdamW", "make_optimizer", "make_scheduler", "discard_step", "grad_norm"]


class SkippableAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose next ``step()`` can be skipped (non-finite step under ZeRO-0)."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def make_optimizer(model, cfg: RunConfig):
    """AdamW over ``model``'s trainable parameters: ``train.weight_decay`` on tensors with 2+ dims,
    none on biases and norms. The class DeepSpeed accepts for the run's ZeRO stage and precision."""
    t = cfg.train
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    zero = cfg.ds_config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, adamw_mode=True)
    if int(zero.get("stage", 0)) == 0 and resolved_precision(t) == "fp32":
        return SkippableAdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)  # DeepSpeed calls it directly
    # ZeRO 1-3 and bf16 wrap the optimizer (and skip overflowing steps themselves); DeepSpeed only
    # accepts the stock class there
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def make_scheduler(optimizer, lr_fn: Callable[[int], float], base_lr: float):
    """``LambdaLR`` whose factor at optimizer step ``s`` is ``lr_fn(s) / base_lr``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_fn(s) / base_lr)


def grad_norm(module) -> torch.Tensor:
    """Global L2 norm of the (already data-parallel reduced) gradients of ``module``: a 0-dim float32
    tensor on the gradients' device (no host synchronisation)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def discard_step(engine, stage: int) -> None:
    """Make the coming ``engine.step()`` leave parameters and optimizer moments untouched.

    ZeRO-0 in fp32 (:class:`SkippableAdamW`): gradients are zeroed (so clipping sees finite values)
    and the optimizer's next step is skipped; the LR schedule still advances. ZeRO 1-3 and bf16
    (``stage=-1``): the non-finite loss already made the reduced gradients non-finite on every rank,
    which DeepSpeed treats as an overflow: it skips the update and zeroes the gradients itself.

    Raises ``RuntimeError`` when the ZeRO-0 optimizer is not a :class:`SkippableAdamW`."""
    if stage == 0:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        opt = engine.optimizer
        while not isinstance(opt, SkippableAdamW) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, SkippableAdamW):
            raise RuntimeError("cannot skip a non-finite step: unexpected optimizer wrapper "
                               f"{type(engine.optimizer).__name__}")
        opt.skip_next = True
