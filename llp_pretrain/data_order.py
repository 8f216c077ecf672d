"""The global order of training samples: virtual readers, the data-layout check, mixture choices.

Contract (``docs/training.md``, "Data loading"): the samples of optimizer step ``s`` (0-based data
position) are a function of the dataset(s), ``train.seed``, ``data.shuffle_buffer`` and
``train.global_batch_size`` only -- not of ``data_parallel_size``, ``sequence_parallel_size`` or
``data.num_workers``.

* ``V`` **virtual readers** (:func:`resolve_virtual_readers`): ``data.virtual_readers`` when set,
  else the largest divisor of ``global_batch_size`` that is ``<= min(64, train shards)`` (for a
  mixture: the fewest train shards of any source). ``V`` divides ``global_batch_size``.
* Train shard ``i`` of each source (by name) belongs to reader ``i % V``. Each reader streams its
  shards endlessly (``llp_pretrain.data.TrainStream``). Step ``s`` takes ``global_batch_size / V``
  consecutive samples from every reader: reader ``v``'s samples ``s*c .. s*c + c - 1``.
* Data-parallel rank ``r`` owns the readers ``{v : v % dp == r}``; so ``dp`` must divide ``V``
  (:func:`data_layout_problem`, the one place this is checked: loader, config validation,
  ``llp-pretrain check-config`` and the launchers' pre-flight).
* Mixtures: the source of reader ``v``'s ``k``-th sample is drawn with the sources' weights from a
  generator seeded by ``(seed, "mix", v, k // MIX_CHUNK)`` (:func:`source_choices`), so it is a
  function of ``k`` alone and counts up to any position are cheap (:func:`source_counts`).

No torch, no I/O: importable by the config loader.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["MAX_VIRTUAL_READERS", "MIX_CHUNK", "derive_seed", "resolve_virtual_readers", "data_layout_problem",
           "rank_readers", "source_choices", "source_counts", "SourceTally"]

#: the default number of virtual readers never exceeds this (it bounds open shards and buffers per process)
MAX_VIRTUAL_READERS = 64
#: mixture source choices are drawn in blocks of this many samples per reader
MIX_CHUNK = 4096


def derive_seed(*parts) -> int:
    """A 64-bit seed from a tuple such as ``(seed, source, epoch, reader, purpose)`` (sha256)."""
    h = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_virtual_readers(global_batch_size: int, train_shards: Sequence[int],
                            requested: Optional[int] = None) -> int:
    """The number ``V`` of virtual readers: ``requested`` (``data.virtual_readers``) or the largest
    divisor of ``global_batch_size`` that is ``<= min(MAX_VIRTUAL_READERS, min(train_shards))``.

    ``train_shards``: train shard count of each source. Raises ``ValueError`` (one line, what to
    change) when ``requested`` does not divide ``global_batch_size`` or exceeds a source's shards."""
    fewest = min(train_shards)
    if fewest < 1:
        raise ValueError("a data source has no train shards; rerun `llp-prep shard`")
    if requested is not None:
        if requested < 1 or global_batch_size % requested:
            raise ValueError(f"data.virtual_readers={requested} must divide train.global_batch_size={global_batch_size} "
                             f"(divisors: {_divisors(global_batch_size)})")
        if requested > fewest:
            raise ValueError(f"data.virtual_readers={requested} exceeds the {fewest} train shard(s) of the smallest "
                             "source (each reader needs a shard): lower it or re-shard with more, smaller shards "
                             "(`llp-prep shard --samples-per-shard`)")
        return requested
    limit = min(MAX_VIRTUAL_READERS, fewest)
    return max(d for d in _divisors(global_batch_size) if d <= limit)


def data_layout_problem(global_batch_size: int, train_shards: Sequence[int], dp_size: int,
                        requested: Optional[int] = None) -> Optional[str]:
    """Why ``dp_size`` data-parallel ranks cannot share the ``V`` virtual readers (``dp`` must
    divide ``V``), as one line saying what to change; None when they can. The single data-layout
    check (loader, config validation, launcher pre-flight)."""
    try:
        v = resolve_virtual_readers(global_batch_size, train_shards, requested)
    except ValueError as e:
        return str(e)
    if v % dp_size == 0:
        return None
    how = ("data.virtual_readers" if requested is not None else
           f"from train.global_batch_size={global_batch_size} and {min(train_shards)} train shard(s)")
    fits = [d for d in _divisors(v)]
    return (f"data_parallel_size={dp_size} does not divide the {v} virtual data readers ({how}): every rank must own "
            f"the same number of readers; use a data_parallel_size in {fits}, or re-shard into more shards "
            f"(`llp-prep shard --samples-per-shard`) with a global_batch_size that is a multiple of {dp_size}, "
            "or set data.virtual_readers (it fixes the sample order of the run)")


def rank_readers(virtual_readers: int, dp_size: int, dp_rank: int) -> List[int]:
    """The readers data-parallel rank ``dp_rank`` owns: ``[v for v in range(V) if v % dp_size == dp_rank]``."""
    return [v for v in range(virtual_readers) if v % dp_size == dp_rank]


def source_choices(seed: int, weights: Sequence[float], reader: int, chunk: int) -> np.ndarray:
    """Source index (int64) of reader ``reader``'s samples ``chunk * MIX_CHUNK ...`` (``MIX_CHUNK`` of
    them): inverse-CDF draws of ``weights`` (normalised) from ``numpy`` PCG64 seeded by
    ``(seed, "mix", reader, chunk)``."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 1:
        return np.zeros(MIX_CHUNK, dtype=np.int64)
    cdf = np.cumsum(w / w.sum())
    u = np.random.Generator(np.random.PCG64(derive_seed(seed, "mix", reader, chunk))).random(MIX_CHUNK)
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1).astype(np.int64)


def source_counts(seed: int, weights: Sequence[float], reader: int, n: int, start: int = 0) -> np.ndarray:
    """How many of reader ``reader``'s samples ``start .. n - 1`` come from each source (int64 array)."""
    out = np.zeros(len(weights), dtype=np.int64)
    if len(weights) == 1:
        out[0] = max(0, n - start)
        return out
    for chunk in range(start // MIX_CHUNK, -(-n // MIX_CHUNK)):
        lo, hi = max(start - chunk * MIX_CHUNK, 0), min(n - chunk * MIX_CHUNK, MIX_CHUNK)
        out += np.bincount(source_choices(seed, weights, reader, chunk)[lo:hi], minlength=len(weights))
    return out


class SourceTally:
    """Samples taken from each source in the global order up to a data position (all ranks together),
    advanced incrementally: a function of the step, so it needs no state in checkpoints.

    Args: ``seed``, ``weights``, ``virtual_readers`` and ``per_reader`` (``global_batch_size / V``)."""

    def __init__(self, seed: int, weights: Sequence[float], virtual_readers: int, per_reader: int):
        self.seed, self.weights = seed, list(weights)
        self.readers, self.per_reader = virtual_readers, per_reader
        self.step, self.samples = 0, np.zeros(len(self.weights), dtype=np.int64)

    def at(self, step: int) -> np.ndarray:
        """Samples per source in data steps ``0 .. step - 1`` (``step`` >= the last one asked)."""
        if step < self.step:
            self.step, self.samples = 0, np.zeros(len(self.weights), dtype=np.int64)
        c = self.per_reader
        for v in range(self.readers):
            self.samples += source_counts(self.seed, self.weights, v, step * c, self.step * c)
        self.step = step
        return self.samples.copy()
