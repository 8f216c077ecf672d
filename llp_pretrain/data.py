"""Streaming WebDataset loader with a deterministic, resumable sample order.

Layout (see ``docs/training.md``):

* Shards of the ``train`` split (sorted by name, from ``manifest.json``) are split by
  **data-parallel rank** first -- shard ``i`` goes to ``dp_rank = i % data_parallel_size`` -- and
  then by **logical worker** -- the ``j``-th shard of a rank goes to worker ``j % num_workers``.
  ``dp_rank = rank // sequence_parallel_size`` is computed by the engine, so sequence-parallel peers
  read the same samples. (webdataset's ``split_by_node`` is not used: it reads the global ``RANK``.)
  Fewer shards than ``data_parallel_size * num_workers`` fails up front (:class:`DataLayoutError`).
* Each worker streams its shards for ever, epoch after epoch (resampled epochs, so every rank runs
  exactly the same number of steps however uneven the shards are). In epoch ``e`` it visits its
  shards in an order shuffled by ``rng(seed, e, dp_rank, worker)`` and passes the raw samples through
  ``webdataset.shuffle`` with a buffer seeded from the same tuple. Nothing else seeds the order.
* Batches of ``micro_batch_size`` samples are formed inside a worker (they may span epochs), and the
  torch DataLoader returns worker batches round-robin, so batch ``b`` of a rank comes from logical
  worker ``b % num_workers``. A loader started at ``consumed_batches = B`` maps physical worker
  ``p`` to logical worker ``(B + p) % num_workers`` and lets each logical worker skip the samples it
  already delivered (whole epochs by arithmetic from the manifest's counts, the rest by reading raw
  samples without decoding), so a resumed run neither repeats nor skips a sample.

Samples are ``tokens.npy`` arrays of ``seq_len + 1`` ids (``docs/internals.md``); batches are
``{"tokens": LongTensor (B, seq_len + 1), "keys": list of "shard/key" strings}``.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from llp_pretrain.config import read_manifest

__all__ = [
    "DataLayoutError",
    "ShardInfo",
    "split_shards",
    "derive_seed",
    "TrainStream",
    "make_train_loader",
    "iter_split_tokens",
    "read_split_stream",
]


class DataLayoutError(ValueError):
    """The shards cannot be split over the requested ranks and workers, or disagree with the manifest."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split: absolute ``path``, its ``name`` and ``samples`` count from the manifest."""

    path: str
    name: str
    samples: int


def list_shards(data_dir: str, split: str, manifest: Optional[Dict] = None) -> List[ShardInfo]:
    """Shards of ``split`` (``train``/``val``) in stream order (by name), from ``manifest.json``.

    Raises ``DataLayoutError`` when the split has no shards or a listed shard file is missing."""
    manifest = manifest or read_manifest(data_dir)
    out = []
    for s in manifest.get("shards", []):
        if s.get("split") != split:
            continue
        p = Path(data_dir) / s["name"]
        if not p.is_file():
            raise DataLayoutError(f"{p}: listed in {Path(data_dir) / 'manifest.json'} but missing; "
                                  "re-run `llp-prep shard` or restore the file")
        out.append(ShardInfo(str(p), s["name"], int(s["samples"])))
    if not out:
        raise DataLayoutError(f"{Path(data_dir) / 'manifest.json'}: no '{split}' shards")
    return sorted(out, key=lambda s: s.name)


def split_shards(shards: Sequence[ShardInfo], dp_size: int, dp_rank: int, num_workers: int) -> List[List[ShardInfo]]:
    """Shards of one data-parallel rank, per logical worker: shard ``i`` -> rank ``i % dp_size``,
    then the rank's ``j``-th shard -> worker ``j % num_workers``.

    Returns a list of ``num_workers`` non-empty lists (disjoint across ranks and workers; their union
    over all ranks and workers is ``shards``). Raises ``DataLayoutError`` if there are fewer shards than
    ``dp_size * num_workers``."""
    w = max(1, num_workers)
    if len(shards) < dp_size * w:
        raise DataLayoutError(
            f"{len(shards)} train shard(s) cannot feed data_parallel_size={dp_size} x num_workers={w} = "
            f"{dp_size * w} readers: re-shard with more, smaller shards (`llp-prep shard --samples-per-shard`) "
            f"or lower data.num_workers")
    mine = [s for i, s in enumerate(shards) if i % dp_size == dp_rank]
    return [[s for j, s in enumerate(mine) if j % w == k] for k in range(w)]


def derive_seed(*parts) -> int:
    """A 64-bit seed from a tuple such as ``(seed, epoch, dp_rank, worker, purpose)`` (sha256)."""
    h = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")


def _decode_tokens(sample: Dict) -> np.ndarray:
    raw = sample.get("tokens.npy")
    if raw is None:
        raise DataLayoutError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no tokens.npy")
    return np.load(io.BytesIO(raw), allow_pickle=False)


class TrainStream(torch.utils.data.IterableDataset):
    """Infinite stream of training micro-batches for one data-parallel rank (see module doc).

    Args:
        data_dir: dataset directory (``manifest.json`` + shards).
        dp_size, dp_rank: data-parallel layout (``dp_rank = rank // sequence_parallel_size``).
        num_workers: DataLoader workers (0 = in-process; counts as one logical worker).
        micro_batch_size: samples per batch.
        seed: run seed.
        shuffle_buffer: samples in each worker's shuffle buffer.
        consumed_batches: batches this rank already consumed (resume position).

    Yields ``{"tokens": LongTensor (micro_batch_size, seq_len + 1), "keys": [str]}``.
    """

    def __init__(self, data_dir: str, dp_size: int, dp_rank: int, num_workers: int, micro_batch_size: int,
                 seed: int, shuffle_buffer: int = 1000, consumed_batches: int = 0, manifest: Optional[Dict] = None):
        super().__init__()
        self.data_dir = str(data_dir)
        self.manifest = manifest or read_manifest(data_dir)
        self.shards = list_shards(self.data_dir, "train", self.manifest)
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.requested_workers = num_workers
        self.num_workers = max(1, num_workers)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.consumed_batches = consumed_batches
        self.worker_shards = split_shards(self.shards, dp_size, dp_rank, num_workers)

    def epoch_samples(self, worker: int) -> int:
        """Samples one epoch of logical worker ``worker`` yields (sum of its shards' counts)."""
        return sum(s.samples for s in self.worker_shards[worker])

    def raw_epoch(self, worker: int, epoch: int) -> Iterator[Dict]:
        """Undecoded samples of one epoch of one logical worker, in their final (shuffled) order."""
        shards = list(self.worker_shards[worker])
        random.Random(derive_seed(self.seed, epoch, self.dp_rank, worker, "shards")).shuffle(shards)
        rng = random.Random(derive_seed(self.seed, epoch, self.dp_rank, worker, "buffer"))
        pipe = wds.DataPipeline(
            wds.SimpleShardList([s.path for s in shards]),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
        )
        n = 0
        for sample in pipe:
            n += 1
            yield sample
        if n != self.epoch_samples(worker):
            raise DataLayoutError(
                f"shards {[s.name for s in shards]} hold {n} samples but {self.data_dir}/manifest.json says "
                f"{self.epoch_samples(worker)}; run `llp-prep verify {self.data_dir}`")

    def worker_samples(self, worker: int, skip: int = 0) -> Iterator[Dict]:
        """Infinite decoded sample stream of a logical worker, starting after ``skip`` samples."""
        per_epoch = self.epoch_samples(worker)
        epoch, offset = divmod(skip, per_epoch)
        while True:
            for i, sample in enumerate(self.raw_epoch(worker, epoch)):
                if i < offset:
                    continue
                key = f"{Path(sample['__url__']).name}/{sample['__key__']}"
                yield key, _decode_tokens(sample)
            epoch, offset = epoch + 1, 0

    def logical_worker(self, physical: int) -> int:
        """Logical worker that physical DataLoader worker ``physical`` plays after the resume offset."""
        return (self.consumed_batches + physical) % self.num_workers

    def skipped_batches(self, logical: int) -> int:
        """Batches logical worker ``logical`` delivered before ``consumed_batches``."""
        b, w = self.consumed_batches, self.num_workers
        return max(0, (b - logical + w - 1) // w)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise DataLayoutError(f"DataLoader has {info.num_workers} workers, stream was built for {self.num_workers}")
        logical = self.logical_worker(physical)
        stream = self.worker_samples(logical, skip=self.skipped_batches(logical) * self.micro_batch_size)
        while True:
            keys, arrays = [], []
            for _ in range(self.micro_batch_size):
                k, a = next(stream)
                keys.append(k)
                arrays.append(a)
            yield {"tokens": torch.from_numpy(np.stack(arrays).astype(np.int64)), "keys": keys}


#: seconds a DataLoader worker outlives a SIGTERM (see :func:`_defer_stop_signals`)
WORKER_TERM_GRACE_S = 30.0


def _defer_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a SIGTERM does not kill a worker at once; SIGUSR1 is ignored.

    SLURM (``scancel --signal``, ``--signal=TERM@T``) and ``kill -- -PGID`` signal every process of
    a job step, workers included. torch's worker handler turns a TERM from anyone but the parent
    into a crash of the worker, and the trainer would die with it instead of checkpointing. Here a
    worker keeps serving for ``WORKER_TERM_GRACE_S`` seconds after a TERM and then exits with
    status 0 (not an error for the trainer); the trainer normally shuts its workers down long
    before. A TERM sent by the interpreter's exit handler (``multiprocessing`` terminates daemonic
    children, then joins them) therefore ends the worker after the grace period instead of never."""
    def on_term(signum, frame):
        timer = threading.Timer(WORKER_TERM_GRACE_S, os._exit, (0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def make_train_loader(stream: TrainStream) -> torch.utils.data.DataLoader:
    """A DataLoader over ``stream`` with ``data.num_workers`` worker processes (0 = in-process);
    batches pass through unchanged and are returned in worker round-robin order. Workers outlive a
    SIGTERM by a grace period and ignore SIGUSR1 (see :func:`_defer_stop_signals`)."""
    workers = stream.requested_workers
    kwargs = dict(prefetch_factor=2, worker_init_fn=_defer_stop_signals) if workers else {}
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, **kwargs)


def iter_split_tokens(data_dir: str, split: str = "val", manifest: Optional[Dict] = None) -> Iterator[np.ndarray]:
    """Samples of a split in stream order (shards by name, samples in tar order), decoded.

    Yields 1-D arrays of ``seq_len + 1`` ids."""
    for shard in list_shards(data_dir, split, manifest):
        for sample in wds.DataPipeline(wds.SimpleShardList([shard.path]), wds.tarfile_to_samples()):
            yield _decode_tokens(sample)


def read_split_stream(data_dir: str, split: str = "val", manifest: Optional[Dict] = None,
                      max_samples: Optional[int] = None) -> np.ndarray:
    """Reassemble a split's token stream: ``concat(s0, s1[1:], s2[1:], ...)`` (consecutive samples
    share one boundary token, ``docs/internals.md``). Raises ``DataLayoutError`` if a boundary token
    does not match (shards out of order or corrupt). Returns a 1-D int64 array."""
    parts, prev = [], None
    for i, arr in enumerate(iter_split_tokens(data_dir, split, manifest)):
        if max_samples is not None and i >= max_samples:
            break
        arr = arr.astype(np.int64)
        if prev is None:
            parts.append(arr)
        else:
            if arr[0] != prev[-1]:
                raise DataLayoutError(f"{data_dir}: {split} sample {i} does not start with the previous sample's "
                                      "last token; shards are out of order or corrupt (`llp-prep verify`)")
            parts.append(arr[1:])
        prev = arr
    if not parts:
        raise DataLayoutError(f"{data_dir}: split '{split}' is empty")
    return np.concatenate(parts)
