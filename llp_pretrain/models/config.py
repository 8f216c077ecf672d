"""Typed, validated model configuration for the six architectures.

The math of every variant is in ``docs/models.md`` (and the shared ``ARCHITECTURES.md``,
arXiv:2412.06106). ``ModelConfig`` is a pydantic model: unknown keys and invalid combinations
fail at construction with a ``pydantic.ValidationError`` whose message names the fields and
says what to change.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

Variant = Literal[
    "gpt",
    "perceiver_ar",
    "history_self_attention",
    "compressed_history",
    "segmented_history",
    "llp",
]

VARIANTS: tuple[str, ...] = (
    "gpt",
    "perceiver_ar",
    "history_self_attention",
    "compressed_history",
    "segmented_history",
    "llp",
)

#: variants that split the window into a history and ``latent_len`` latents (PerceiverAR family)
LATENT_VARIANTS: tuple[str, ...] = (
    "perceiver_ar",
    "history_self_attention",
    "compressed_history",
    "segmented_history",
)


class ModelConfig(BaseModel):
    """Sizes and options of one model (see ``docs/models.md``).

    Fields:
        variant: one of ``gpt``, ``perceiver_ar``, ``history_self_attention``,
            ``compressed_history``, ``segmented_history``, ``llp``.
        vocab_size: number of token ids ``V`` (logits are ``(B, T, V)``).
        d_model: model width ``D``; must be divisible by ``n_heads`` with an even head width
            ``d = D / H`` (RoPE rotates pairs).
        n_heads, n_layers: heads per attention, number of pre-norm blocks.
        seq_len: context window ``N`` in tokens (a shard sample holds ``seq_len + 1`` tokens).
        latent_len: ``m``, latents of the PerceiverAR family; ``1 <= m < seq_len``.
        segment_len / n_segments: LLP segment length ``L`` and count ``S = N / L``; give either
            (the other is derived) or both consistently.
        compression_len: ``c``, compressed history length of ``compressed_history``
            (default ``seq_len // 4`` as in the reference); ``1 <= c <= seq_len - latent_len``.
        history_segments: ``k``, history segments of ``segmented_history``; must divide
            ``seq_len - latent_len``.
        dropout: attention-probability and MLP dropout (default 0 for pretraining).
        rope_theta: RoPE base (10000).
        shared_kv: one ``kv`` projection whose (rotated, normed) output serves as keys *and*
            values (reference behaviour); default separate K and V.
        kv_layernorm: per-head LayerNorm (width ``d``) on keys/values after RoPE (reference in
            variants 2-5).
        rope_layers: ``all`` (default) or ``first`` (reference: layer 0 only).
        separate_first_segment_proj: LLP only; segment 0 uses its own output projection
            (reference ``to_out_0``).
        tie_embeddings: the output head shares the token-embedding matrix.
        checkpoint_activations: non-reentrant activation checkpointing per block when training.
        mlp_ratio: MLP size. ``gelu``: hidden width ``mlp_ratio * d_model``. ``swiglu``: hidden
            width ``mlp_hidden`` = ``2 * mlp_ratio * d_model / 3`` rounded to the nearest
            multiple of 8 (ties up, at least 8), so its three matrices hold as many weights as
            gelu's two (up to the rounding).
        norm: ``layernorm`` (default) or ``rmsnorm`` for the block and final norms (the per-head
            ``kv_layernorm`` stays a LayerNorm).
        mlp: ``gelu`` (default: ``Linear -> GELU -> Linear``) or ``swiglu``
            (``Linear(SiLU(x W_gate) * (x W_up))``).
        bias: biases on the linear layers that have one by default (attention output
            projections, MLP, output head, compressed-history ``Linear(h, c)``); ``False``
            removes them all (q/k/v projections never have one; norms keep theirs).
        n_kv_heads: key/value heads ``Hkv`` (grouped-query attention); must divide ``n_heads``;
            default ``n_heads``. Query head ``h`` uses key/value head ``h // (n_heads / Hkv)``.
            Shrinks K/V projections, generation caches and LLP's sequence-parallel halo by
            ``n_heads / Hkv``.
        loss_chunk_len: the training loss projects, log-softmaxes and scores at most this many
            token rows at a time, recomputing each chunk in backward, so the ``(B, N, V)``
            logits never exist during training (``loss.py``); 0 = one pass over all rows.
        compressed_history_residual: residual of ``compressed_history``'s layer 0: ``compress``
            (default: history inputs compressed like the history outputs, latents keep their
            inputs) or ``truncate`` (reference: adds ``x[:, :c + m]``, misaligned when c != h).
    """

    model_config = ConfigDict(extra="forbid")

    variant: Variant
    vocab_size: int = Field(gt=0)
    d_model: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    latent_len: Optional[int] = None
    segment_len: Optional[int] = None
    n_segments: Optional[int] = None
    compression_len: Optional[int] = None
    history_segments: Optional[int] = None
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    rope_theta: float = Field(default=10000.0, gt=0.0)
    shared_kv: bool = False
    kv_layernorm: bool = False
    rope_layers: Literal["all", "first"] = "all"
    separate_first_segment_proj: bool = False
    tie_embeddings: bool = False
    checkpoint_activations: bool = False
    mlp_ratio: int = Field(default=4, gt=0)
    compressed_history_residual: Literal["compress", "truncate"] = "compress"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True
    n_kv_heads: Optional[int] = Field(default=None, gt=0)
    loss_chunk_len: int = Field(default=4096, ge=0)

    @model_validator(mode="after")
    def _check_combination(self) -> "ModelConfig":
        """Cross-field rules; every independent violation is reported at once (one ``ValueError``
        whose message joins them with ``; ``)."""
        problems = []
        for check in (self._check_heads, self._check_kv_heads, self._check_variant, self._check_llp_only):
            try:
                check()
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _check_heads(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"head width d_model/n_heads = {self.d_model // self.n_heads} must be even "
                "(RoPE rotates pairs); change d_model or n_heads"
            )

    def _check_kv_heads(self) -> None:
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}) "
                "(each key/value head serves n_heads / n_kv_heads query heads)"
            )

    def _check_variant(self) -> None:
        v = self.variant
        if v == "llp":
            self._resolve_segments()
        if v in LATENT_VARIANTS:
            if self.latent_len is None:
                raise ValueError(f"latent_len is required for variant {v!r}")
            if not 1 <= self.latent_len < self.seq_len:
                raise ValueError(
                    f"latent_len ({self.latent_len}) must satisfy 1 <= latent_len < seq_len "
                    f"({self.seq_len}) for variant {v!r}"
                )
        if v == "segmented_history":
            h = self.seq_len - self.latent_len
            if self.history_segments is None:
                raise ValueError("history_segments is required for variant 'segmented_history'")
            if self.history_segments <= 0 or h % self.history_segments != 0:
                raise ValueError(
                    f"history_segments ({self.history_segments}) must be positive and divide the "
                    f"history length seq_len - latent_len = {h}"
                )
        if v == "compressed_history":
            h = self.seq_len - self.latent_len
            if self.compression_len is None:
                object.__setattr__(self, "compression_len", max(1, self.seq_len // 4))
            if not 1 <= self.compression_len <= h:
                raise ValueError(
                    f"compression_len ({self.compression_len}) must satisfy 1 <= compression_len "
                    f"<= seq_len - latent_len ({h})"
                )

    def _check_llp_only(self) -> None:
        if self.separate_first_segment_proj and self.variant != "llp":
            raise ValueError(
                f"separate_first_segment_proj is an LLP option; variant is {self.variant!r}"
            )

    def _resolve_segments(self) -> None:
        n, L, S = self.seq_len, self.segment_len, self.n_segments
        if L is None and S is None:
            raise ValueError("variant 'llp' needs segment_len or n_segments")
        if L is not None and L <= 0:
            raise ValueError(f"segment_len ({L}) must be positive")
        if S is not None and S <= 0:
            raise ValueError(f"n_segments ({S}) must be positive")
        if L is None:
            if n % S != 0:
                raise ValueError(
                    f"seq_len ({n}) must be a multiple of n_segments ({S})"
                )
            L = n // S
        if S is None:
            if n % L != 0:
                raise ValueError(
                    f"seq_len ({n}) must be a multiple of segment_len ({L})"
                )
            S = n // L
        if L * S != n:
            raise ValueError(
                f"segment_len ({L}) * n_segments ({S}) must equal seq_len ({n})"
            )
        object.__setattr__(self, "segment_len", L)
        object.__setattr__(self, "n_segments", S)

    @property
    def head_dim(self) -> int:
        """Head width ``d = d_model / n_heads``."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads ``Hkv`` (``n_kv_heads``, default ``n_heads``)."""
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width: ``mlp_ratio * d_model`` for ``gelu``; for ``swiglu`` the multiple
        of 8 nearest to ``2 * mlp_ratio * d_model / 3`` (ties up; at least 8), so that its three
        ``D x hidden`` matrices match gelu's two ``D x r D`` ones in weights."""
        if self.mlp == "gelu":
            return self.mlp_ratio * self.d_model
        return 8 * max(1, (self.mlp_ratio * self.d_model + 6) // 12)  # ties round up

    @property
    def history_len(self) -> int:
        """History length ``h = seq_len - latent_len`` (PerceiverAR family), else 0."""
        if self.variant in LATENT_VARIANTS:
            return self.seq_len - self.latent_len
        return 0

    def uses_rope(self, layer: int) -> bool:
        """Whether attention layer ``layer`` applies RoPE (``rope_layers``)."""
        return self.rope_layers == "all" or layer == 0
