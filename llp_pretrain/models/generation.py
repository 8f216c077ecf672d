"""Autoregressive generation.

- ``gpt``: key/value cache (``GPTCache``) up to ``seq_len`` tokens; beyond that every step
  re-runs the last ``seq_len`` tokens as a window (correct, ``O(seq_len^2)`` per token).
- ``llp``: ``LLPCache`` keeps at most two segments of keys/values per layer; decode memory and
  time per token are flat however long the text grows, beyond ``seq_len`` too. The logits equal
  a full forward over the whole text (LLP takes any length; its receptive field is finite).
- PerceiverAR family: no cache; each step runs the model on the last ``seq_len`` tokens
  (left-padded with token 0 for ``compressed_history``/``segmented_history`` when shorter,
  which need exactly ``seq_len`` tokens; ``perceiver_ar``/``history_self_attention`` run on the
  shorter window directly).
"""
from __future__ import annotations

from typing import Optional

import torch

from .gpt import GPTCache
from .llp import LLPCache


class DecodeState:
    """Cache plus the number of tokens it has seen (``n``); built by ``prefill``."""

    def __init__(self, cache, n: int = 0):
        self.cache = cache
        self.n = n


def new_cache(model, batch: int):
    """An empty cache for ``model`` (``gpt`` or ``llp``) and ``batch`` rows."""
    cfg = model.cfg
    p = next(model.parameters())
    if cfg.variant == "llp":
        return LLPCache(cfg.n_layers, batch, cfg.kv_heads, cfg.head_dim, cfg.segment_len,
                        dtype=p.dtype, device=p.device)
    if cfg.variant == "gpt":
        return GPTCache(cfg.n_layers, batch, cfg.kv_heads, cfg.head_dim, cfg.seq_len,
                        dtype=p.dtype, device=p.device)
    raise ValueError(f"variant {cfg.variant!r} has no key/value cache")


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    """Run the prompt ``ids`` ``(B, T)`` once, filling a cache. Returns ``(logits (B, V) of the
    last prompt token, DecodeState)``. ``gpt`` needs ``T <= seq_len``."""
    B, T = ids.shape
    if model.cfg.variant == "gpt" and T > model.cfg.seq_len:
        raise ValueError(f"gpt prefill of {T} tokens exceeds seq_len={model.cfg.seq_len}")
    state = DecodeState(new_cache(model, B), 0)
    logits = model(ids, _cache=state.cache)
    state.n = T
    return logits[:, -1], state


@torch.no_grad()
def decode_step(model, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Feed one token per row ``(B,)`` at position ``state.n``; returns its logits ``(B, V)``."""
    x = model.tok_emb(token.view(-1, 1))
    for blk in model.blocks:
        x = blk.decode(x, state.n, state.cache)
    state.n += 1
    return model.lm_head(model.final_norm(x))[:, 0]


def window_logits(model, ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Logits ``(B, V)`` of the last token of ``ids`` ``(B, T)`` from a full forward over the
    last ``seq_len`` tokens (the uncached path); variants that need a full window are left-padded
    with ``pad_id`` (the caller's tokenizer id, ``special_ids.generation_ids``)."""
    cfg = model.cfg
    win = ids[:, -cfg.seq_len:]
    if cfg.variant in ("compressed_history", "segmented_history") and win.shape[1] < cfg.seq_len:
        pad = cfg.seq_len - win.shape[1]
        win = torch.cat([win.new_full((win.shape[0], pad), pad_id), win], dim=1)
    return model(win)[:, -1]


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
           top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pick one token per row from ``logits`` ``(B, V)``: greedy when ``temperature == 0``,
    else softmax(logits / temperature) restricted to the ``top_k`` largest and to the smallest
    set whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep tokens until the mass reaches top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: Optional[int] = None, seed: Optional[int] = None, pad_id: int = 0) -> torch.Tensor:
    """Continue ``prompt_ids`` (``(T,)`` or ``(B, T)`` ints) by ``max_new_tokens`` tokens;
    ``pad_id`` left-pads short windows of the variants that need full ones (:func:`window_logits`).

    Returns the prompt plus the new tokens, ``(B, T + n)`` (``(T + n,)`` for a 1-D prompt),
    ``n <= max_new_tokens``: generation stops early once every row has produced ``eos_id``
    (rows that finished earlier are filled with ``eos_id``). ``seed`` makes sampling
    reproducible. Raises ``ValueError`` on an empty prompt, negative ``max_new_tokens`` or
    ``temperature``, ``top_k < 1`` or ``top_p`` outside ``(0, 1]``.
    """
    was_training = model.training
    model.eval()
    try:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long,
                              device=next(model.parameters()).device)
        one_d = ids.dim() == 1
        if one_d:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError("prompt_ids must be a non-empty (T,) or (B, T) sequence of ids")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or unset), got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or unset), got {top_p}")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=ids.device)
            gen.manual_seed(int(seed))
        cfg = model.cfg
        variant = cfg.variant
        state = None
        if variant == "llp" or (variant == "gpt" and ids.shape[1] <= cfg.seq_len):
            logits, state = prefill(model, ids)
        else:
            logits = window_logits(model, ids, pad_id)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        out = [ids]
        for step in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p, gen)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done |= tok == eos_id
            out.append(tok[:, None])
            if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            if state is not None and (variant == "llp" or state.n < cfg.seq_len):
                logits = decode_step(model, tok, state)
            else:
                state = None
                logits = window_logits(model, torch.cat(out, dim=1), pad_id)
        res = torch.cat(out, dim=1)
        return res[0] if one_d else res
    finally:
        model.train(was_training)
