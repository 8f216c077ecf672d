"""Strided sliding-window perplexity over a split's reassembled token stream.

The stream ``x[0..L-1]`` of a split is rebuilt from its samples (``docs/internals.md``). A window
starting at ``b`` feeds ``x[b : b+N]`` (``N = seq_len``) and predicts ``x[b+1 : b+N+1]``; the model
emits logits for the last ``T`` window positions (``T = N`` for ``gpt``/``llp``, ``latent_len`` for the
PerceiverAR family, from ``model.trained_positions``). Windows advance by ``stride`` (the last one is
moved back to end exactly at ``x[L-1]``), and a window scores only the targets after the previous
window's last target. So every target from ``x[N-T+1]`` to ``x[L-1]`` is scored exactly once, and in
every window but the first with at least ``N - stride`` tokens of context (the standard strided
evaluation, e.g. Hugging Face's "perplexity of fixed-length models"; ``stride = N`` is plain
non-overlapping evaluation). ``1 <= stride <= T`` is required.

Bits per byte = ``nll_nats / ln 2 / (tokens * text_bytes / text_tokens)`` with the manifest's
``text_bytes / text_tokens`` of the split (tokenizer independent).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["EvalResult", "window_plan", "score_windows", "summarize", "bytes_per_token", "unigram_eval"]


@dataclass
class EvalResult:
    """``tokens`` scored, mean ``loss`` (nats/token), ``ppl`` = exp(loss), ``bits_per_byte``."""

    tokens: int
    loss: float
    ppl: float
    bits_per_byte: Optional[float]

    def to_dict(self) -> Dict:
        return asdict(self)


def window_plan(stream_len: int, seq_len: int, stride: int, trained_len: int) -> List[Tuple[int, int]]:
    """Windows as ``(begin, first_scored_index)``: inputs ``x[begin:begin+seq_len]``, scored window
    indices ``j in [first_scored_index, seq_len)`` predicting ``x[begin+j+1]``.

    Raises ``ValueError`` if the stream is shorter than ``seq_len + 1`` or the stride is outside
    ``[1, trained_len]``."""
    n, t = seq_len, trained_len
    if not 1 <= stride <= t:
        raise ValueError(f"stride {stride} must be between 1 and the model's trained positions per window ({t})")
    if stream_len < n + 1:
        raise ValueError(f"the stream has {stream_len} tokens; at least seq_len + 1 = {n + 1} are needed")
    plan = [(0, n - t)]
    prev_end = n  # windows scored every prediction position < prev_end
    while prev_end < stream_len - 1:
        b = min(plan[-1][0] + stride, stream_len - 1 - n)
        plan.append((b, prev_end - b))
        prev_end = b + n
    return plan


@torch.no_grad()
def score_windows(forward: Callable[[torch.Tensor], torch.Tensor], stream: torch.Tensor,
                  plan: Sequence[Tuple[int, int]], seq_len: int, trained_len: int, batch_size: int = 8,
                  device: Optional[torch.device] = None, pad_to: Optional[int] = None) -> Tuple[float, int]:
    """Sum of negative log-likelihoods (nats, float64) and number of scored targets over ``plan``.

    ``forward(inputs (B, seq_len) int64) -> logits (B, trained_len, V)`` for the last ``trained_len``
    positions. ``pad_to`` runs extra all-zero-weight batches so that every rank makes the same number
    of forward calls (needed under ZeRO-3, whose forward is collective)."""
    device = device or stream.device
    n, t = seq_len, trained_len
    total, count = 0.0, 0
    n_batches = (len(plan) + batch_size - 1) // batch_size
    for bi in range(max(n_batches, pad_to or 0)):
        chunk = plan[bi * batch_size:(bi + 1) * batch_size]
        if not chunk:  # padding call: same shapes, result discarded
            chunk, weight = [(0, n)] * min(batch_size, max(1, len(plan))), 0.0
        else:
            weight = 1.0
        idx = torch.tensor([b for b, _ in chunk])
        ar = torch.arange(n + 1)
        windows = stream[idx[:, None] + ar[None, :]].to(device)
        logits = forward(windows[:, :-1])
        if logits.shape[1] != t:
            raise ValueError(f"model returned {logits.shape[1]} positions, expected trained_len={t}")
        logp = torch.log_softmax(logits.float(), dim=-1)
        tgt = windows[:, n - t + 1:]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T) for window positions n-t .. n-1
        pos = torch.arange(n - t, n, device=nll.device)
        first = torch.tensor([j for _, j in chunk], device=nll.device)
        mask = pos[None, :] >= first[:, None]
        if weight:
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
    return total, count


def bytes_per_token(manifest: Optional[Dict], split: str) -> Optional[float]:
    """``text_bytes / text_tokens`` of a split from the manifest, or None if absent."""
    try:
        tot = manifest["totals"][split]
        return float(tot["text_bytes"]) / float(tot["text_tokens"])
    except (TypeError, KeyError, ZeroDivisionError):
        return None


def summarize(nll_sum: float, tokens: int, bpt: Optional[float]) -> EvalResult:
    """Mean loss, perplexity and bits per byte from a NLL sum (nats) over ``tokens`` targets."""
    loss = nll_sum / max(tokens, 1)
    bpb = (nll_sum / math.log(2)) / (tokens * bpt) if bpt else None
    return EvalResult(tokens=tokens, loss=loss, ppl=math.exp(min(loss, 700.0)), bits_per_byte=bpb)


def unigram_eval(train_counts: np.ndarray, targets: np.ndarray, bpt: Optional[float] = None) -> EvalResult:
    """A unigram model of the training tokens (add-one smoothed frequencies) scored on ``targets``."""
    probs = (train_counts.astype(np.float64) + 1.0) / (train_counts.sum() + len(train_counts))
    nll = float(-np.log(probs[targets]).sum())
    return summarize(nll, len(targets), bpt)
