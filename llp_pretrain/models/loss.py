"""Language-model loss on a shard sample."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(model, tokens: torch.Tensor, **forward_kwargs):
    """Summed cross-entropy of ``model`` on ``tokens`` ``(B, N + 1)`` (one shard sample per row).

    Inputs are ``tokens[:, :N]``; the logit at input position ``i`` is scored against token
    ``i + 1``, exactly once, for each ``i`` in ``model.trained_positions(N)``.
    ``forward_kwargs`` go to ``model.forward`` (e.g. ``seq_parallel``). ``model`` may be a
    wrapper (DDP, DeepSpeed engine) whose ``.module`` is the ``LMModel``.
    Returns ``(loss_sum, n_tokens)``: a scalar fp32 tensor (nats) and an int.
    Raises ``ValueError`` if ``tokens`` is not 2-D with at least 2 columns.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (B, N + 1) with N >= 1, got {tuple(tokens.shape)}")
    N = tokens.shape[1] - 1
    inputs = tokens[:, :N]
    logits = model(inputs, **forward_kwargs)
    inner = model if hasattr(model, "trained_positions") else getattr(model, "module", model)
    sl = inner.trained_positions(N)  # also through wrappers such as a DeepSpeed engine
    targets = tokens[:, 1:][:, sl]
    if logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match trained targets {tuple(targets.shape)}"
        )
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
    )
    return loss_sum, targets.numel()
