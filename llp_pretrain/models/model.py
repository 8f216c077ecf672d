"""``LMModel``: token embedding -> pre-norm blocks -> LayerNorm -> head, for all six variants.

Block (pre-norm, as the reference): ``x = R(x) + Attn(LN(x)); x = x + MLP(LN(x))`` where ``R``
is the identity except where an attention layer changes the number of rows (PerceiverAR layer 0
keeps the latent rows; compressed history compresses the history rows).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LATENT_VARIANTS, ModelConfig
from .gpt import CausalSelfAttention
from .layers import MLP, ForwardContext, make_norm
from .llp import LLPAttention
from .perceiver import (
    CompressedHistoryAttention,
    HistorySelfAttention,
    PerceiverARAttention,
    SegmentedHistoryAttention,
)

ATTENTION_CLASSES = {
    "gpt": CausalSelfAttention,
    "llp": LLPAttention,
    "perceiver_ar": PerceiverARAttention,
    "history_self_attention": HistorySelfAttention,
    "segmented_history": SegmentedHistoryAttention,
    "compressed_history": CompressedHistoryAttention,
}


class Block(nn.Module):
    """One pre-norm block: attention then MLP, each with a residual connection."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = ATTENTION_CLASSES[cfg.variant](cfg, layer)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.attn.residual(x, ctx) + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: torch.Tensor, position: int, cache) -> torch.Tensor:
        x = x + self.attn.decode(self.attn_norm(x), position, cache)
        return x + self.mlp(self.mlp_norm(x))


class LMModel(nn.Module):
    """A language model of one variant (``cfg.variant``); see ``docs/models.md``.

    ``forward(input_ids (B, N) int64, seq_parallel=None, return_all=False) -> (B, T, V)``
    logits for the trained positions (``trained_positions(N)``): ``T = N`` for ``gpt`` and
    ``llp``, the last ``latent_len`` positions for the PerceiverAR family.
    ``forward(input_ids, targets=(B, T) int64)`` returns the summed cross-entropy instead,
    computed in chunks of ``cfg.loss_chunk_len`` rows (``head_loss``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) weights, zero biases, residual projections scaled by
        ``1/sqrt(2 n_layers)``; the compressed-history ``Linear(h, c)`` keeps torch's default."""
        std = 0.02
        for name, mod in self.named_modules():
            if name.endswith("hist_proj"):
                continue
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                s = std
                if name.endswith(("out_proj", "out_proj_first", "fc2")):
                    s = std / (2 * self.cfg.n_layers) ** 0.5
                nn.init.normal_(mod.weight, 0.0, s)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    # ---- shapes -------------------------------------------------------------------------
    def trained_positions(self, N: int) -> slice:
        """Global positions (within an input of ``N`` tokens) the logits correspond to."""
        if self.cfg.variant in LATENT_VARIANTS:
            return slice(N - min(self.cfg.latent_len, N), N)
        return slice(0, N)

    def _check_input(self, input_ids: torch.Tensor, seq_parallel) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, N), got shape {tuple(input_ids.shape)}")
        N = input_ids.shape[1]
        v = self.cfg.variant
        if N < 1:
            raise ValueError("input_ids must hold at least one token")
        if v in ("compressed_history", "segmented_history") and N != self.cfg.seq_len:
            raise ValueError(
                f"variant {v!r} needs exactly seq_len={self.cfg.seq_len} tokens, got N={N}"
            )
        if seq_parallel is not None:
            if v != "llp":
                raise ValueError(f"seq_parallel is only supported by variant 'llp', not {v!r}")
            if N % self.cfg.segment_len != 0:
                raise ValueError(
                    f"with seq_parallel the local chunk ({N} tokens) must be a whole number of "
                    f"segments of segment_len={self.cfg.segment_len}"
                )
            off = int(seq_parallel.position_offset)
            if off % self.cfg.segment_len != 0:
                raise ValueError(
                    f"seq_parallel.position_offset ({off}) must be a multiple of segment_len"
                )

    # ---- forward ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, seq_parallel=None, return_all: bool = False,
                _cache=None, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(B, T, V)`` for the trained positions of ``input_ids`` ``(B, N)``, or with
        ``targets`` the summed fp32 cross-entropy (nats, scalar) of those logits against
        ``targets`` ``(B, T)`` int64, without ever holding all ``(B, T, V)`` logits
        (``head_loss``). The loss is computed inside this forward so that wrappers which
        gather parameters around a module's forward (DeepSpeed ZeRO-3) see the head used.

        ``seq_parallel`` (LLP only): object with ``position_offset`` (int, global position of
        the chunk's first token) and ``exchange_halo(k_last, v_last)``; see ``llp.py``.
        ``return_all``: for the PerceiverAR family return every final row (``N`` rows, ``c + m``
        for compressed history, ``m`` for perceiver_ar) instead of the latents only.
        Raises ``ValueError`` on inputs the variant cannot take and on ``targets`` whose shape
        is not that of the logits' first two axes.
        """
        self._check_input(input_ids, seq_parallel)
        B, N = input_ids.shape
        cfg = self.cfg
        ids = input_ids
        if cfg.variant == "llp" and N % cfg.segment_len != 0:
            pad = cfg.segment_len - N % cfg.segment_len
            # right padding up to a whole segment: causal, and sliced off below, so its value (any
            # valid id; 0 here) never reaches an output -- no tokenizer id is assumed
            ids = torch.cat([ids, ids.new_zeros(B, pad)], dim=1)
        offset = int(seq_parallel.position_offset) if seq_parallel is not None else 0
        ctx = ForwardContext(n_tokens=N, offset=offset, seq_parallel=seq_parallel, cache=_cache)
        x = self.tok_emb(ids)
        use_ckpt = cfg.checkpoint_activations and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if use_ckpt:  # a re-computed halo exchange is replayed by seq_parallel itself (parallel/halo.py)
                x = checkpoint(blk, x, ctx, use_reentrant=False)
            else:
                x = blk(x, ctx)
        if cfg.variant == "llp":
            x = x[:, :N]
        elif cfg.variant in LATENT_VARIANTS and not return_all:
            x = x[:, x.shape[1] - min(cfg.latent_len, N):]
        if targets is None:
            return self.lm_head(self.final_norm(x))
        if tuple(targets.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"targets {tuple(targets.shape)} do not match the trained positions "
                f"{tuple(x.shape[:2])} of the logits")
        return self.head_loss(self.final_norm(x), targets)

    # ---- loss ---------------------------------------------------------------------------
    def _chunk_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed fp32 cross-entropy of ``lm_head(h)`` (``h`` ``(R, D)``) against ``(R,)``."""
        return F.cross_entropy(self.lm_head(h).float(), targets, reduction="sum")

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed fp32 cross-entropy (nats) of ``lm_head(h)`` for normed final rows ``h``
        ``(B, T, D)`` against ``targets`` ``(B, T)``, ``cfg.loss_chunk_len`` rows at a time.

        With more rows than one chunk and autograd recording, each chunk's projection,
        log-softmax and loss run under non-reentrant ``torch.utils.checkpoint``: the forward
        keeps only the scalar, backward recomputes the chunk's ``(chunk, V)`` logits (one
        extra head projection per token), so at most one chunk's logits exist at a time.
        The head is called as a module (``self.lm_head``) in the forward and in the
        recomputation, so ZeRO-3's module hooks gather its weight both times. Equal to the
        unchunked loss up to float summation order (tested, values and gradients).
        """
        D = h.shape[-1]
        rows, tg = h.reshape(-1, D), targets.reshape(-1)
        C = self.cfg.loss_chunk_len
        if C == 0 or rows.shape[0] <= C:
            return self._chunk_loss(rows, tg)
        recompute = torch.is_grad_enabled()
        total = None
        for hc, tc in zip(rows.split(C), tg.split(C)):
            if recompute:
                part = checkpoint(self._chunk_loss, hc, tc, use_reentrant=False)
            else:
                part = self._chunk_loss(hc, tc)
            total = part if total is None else total + part
        return total

    # ---- accounting ---------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once); optionally without the
        token embedding."""
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        if exclude_embeddings:
            total -= self.tok_emb.weight.numel()
        return total

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Analytic forward+backward FLOPs per input token of a ``seq_len`` window
        (see ``flops.py``)."""
        from .flops import flops_per_token

        return flops_per_token(self.cfg, seq_len or self.cfg.seq_len)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_id: Optional[int] = None, seed: Optional[int] = None, pad_id: int = 0) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt_ids`` ``(T,)`` or ``(B, T)``; see
        ``generation.generate``."""
        from .generation import generate

        return generate(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, seed=seed, pad_id=pad_id)


def build_model(cfg: ModelConfig) -> LMModel:
    """Build an ``LMModel`` from a validated ``ModelConfig`` (or a dict of its fields)."""
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.model_validate(cfg)
    return LMModel(cfg)
