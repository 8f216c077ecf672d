"""Language-model loss on a shard sample."""
from __future__ import annotations

import torch


def lm_loss(model, tokens: torch.Tensor, **forward_kwargs):
    """Summed cross-entropy of ``model`` on ``tokens`` ``(B, N + 1)`` (one shard sample per row).

    Inputs are ``tokens[:, :N]``; the logit at input position ``i`` is scored against token
    ``i + 1``, exactly once, for each ``i`` in ``model.trained_positions(N)``. The model
    computes the loss itself (``model(inputs, targets=...)``, ``LMModel.head_loss``): in
    chunks of ``cfg.loss_chunk_len`` rows, recomputed in backward, so the ``(B, N, V)``
    logits never exist at once.
    ``forward_kwargs`` go to ``model.forward`` (e.g. ``seq_parallel``). ``model`` may be a
    wrapper (DDP, DeepSpeed engine) whose ``.module`` is the ``LMModel``.
    Returns ``(loss_sum, n_tokens)``: a scalar fp32 tensor (nats) and an int.
    Raises ``ValueError`` if ``tokens`` is not 2-D with at least 2 columns.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (B, N + 1) with N >= 1, got {tuple(tokens.shape)}")
    N = tokens.shape[1] - 1
    inputs = tokens[:, :N]
    inner = model if hasattr(model, "trained_positions") else getattr(model, "module", model)
    sl = inner.trained_positions(N)  # also through wrappers such as a DeepSpeed engine
    targets = tokens[:, 1:][:, sl]
    loss_sum = model(inputs, targets=targets, **forward_kwargs)
    return loss_sum, targets.numel()
