"""Split one sample's sequence into the contiguous chunk a sequence-parallel rank holds.

A shard sample is ``tokens`` ``(B, N + 1)`` (``docs/internals.md``): position ``i`` is scored
against token ``i + 1``. Rank ``r`` of a group of ``P`` holds input positions
``[r * N / P, (r + 1) * N / P)`` and their targets (the next tokens), so the chunks of a group
score every position exactly once, as the single-rank loss does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LocalChunk(NamedTuple):
    """This rank's share of a batch.

    Attributes:
        input_ids: ``(B, N / P)`` int64, positions ``[offset, offset + N / P)``.
        targets: ``(B, N / P)`` int64, the tokens at positions ``+ 1``.
        position_offset: global position (tokens) of ``input_ids[:, 0]``.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_offset: int


def check_divisible(seq_len: int, sequence_parallel_size: int, segment_len: int) -> int:
    """Validate ``N % (P * L) == 0`` and return the chunk length ``N / P`` (tokens).

    Raises:
        ValueError: naming ``model.seq_len``, ``model.segment_len`` and
            ``parallel.sequence_parallel_size`` and the nearest valid ``seq_len``.
    """
    p, L, n = int(sequence_parallel_size), int(segment_len), int(seq_len)
    if p < 1 or L < 1:
        raise ValueError(
            f"parallel.sequence_parallel_size ({p}) and model.segment_len ({L}) must be >= 1"
        )
    if n % (p * L) != 0:
        lo = (n // (p * L)) * (p * L)
        raise ValueError(
            f"model.seq_len={n} is not divisible by parallel.sequence_parallel_size * "
            f"model.segment_len = {p} * {L} = {p * L}: every rank must hold a whole number of "
            f"segments. Use seq_len {lo or p * L} or {lo + p * L}, or change "
            f"sequence_parallel_size/segment_len"
        )
    return n // p


def local_chunk(tokens: torch.Tensor, sp_rank: int, sequence_parallel_size: int,
                segment_len: int) -> LocalChunk:
    """Slice this rank's inputs and targets out of full samples.

    Args:
        tokens: ``(B, N + 1)`` token ids of whole samples (identical on all ``P`` peers).
        sp_rank: chunk index ``r`` in ``[0, P)``.
        sequence_parallel_size: ``P``.
        segment_len: LLP segment length ``L`` (tokens).

    Returns:
        :class:`LocalChunk` with ``input_ids = tokens[:, r*n : (r+1)*n]`` and
        ``targets = tokens[:, r*n + 1 : (r+1)*n + 1]``, ``n = N / P``.

    Raises:
        ValueError: ``tokens`` is not 2-D, ``sp_rank`` is out of range, or ``N`` is not
            divisible by ``P * L`` (see :func:`check_divisible`).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens must be (B, seq_len + 1) token ids, got shape {tuple(tokens.shape)}"
        )
    n_total = tokens.shape[1] - 1
    n = check_divisible(n_total, sequence_parallel_size, segment_len)
    if not 0 <= sp_rank < sequence_parallel_size:
        raise ValueError(f"sp_rank {sp_rank} outside [0, {sequence_parallel_size})")
    start = sp_rank * n
    tokens = tokens.long()
    return LocalChunk(
        input_ids=tokens[:, start:start + n],
        targets=tokens[:, start + 1:start + n + 1],
        position_offset=start,
    )
