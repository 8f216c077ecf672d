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
``{"tokens": LongTensor (B, seq_len + 1), "keys": list of "shard/key" strings, "skipped": int}``.

Shard bytes are not trusted. Every loader reads shards through :func:`read_shard`, which checks every
sample with :func:`check_sample` (``tokens.npy`` decodes to ``dtype[seq_len + 1]`` of the manifest,
ids ``< tokenizer.piece_count``, and, with ``verify_checksums``, the blake2b-128 of the tokens and
the sample's split index that ``llp-prep`` stored in the sample's ``json``) and checks each shard's
sample count against the manifest as soon as the shard ends. A failure is one line naming the shard
and the sample (:class:`CorruptDataError`). Policy ``on_corrupt``: ``fail`` stops the run;
``skip`` logs the sample (or the unreadable rest of a shard) on stderr, counts it and goes on. The
check runs before the shuffle buffer, so a skipped sample is simply absent from the stream: every
rank still runs the same number of steps (the stream is endless), and a resumed run skips the same
samples as long as the shard files are unchanged (see ``docs/training.md``). A DataLoader worker
never raises: it hands the error to the trainer process, which raises it there (no worker
traceback, no worker left behind).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds

from llp_pretrain.config import read_manifest

__all__ = [
    "DataLayoutError",
    "CorruptDataError",
    "SampleSpec",
    "check_sample",
    "read_shard",
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


class CorruptDataError(DataLayoutError):
    """A sample or shard fails validation; the message is one line naming the shard and the sample."""


ON_CORRUPT = ("fail", "skip")


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split: absolute ``path``, its ``name`` and ``samples`` count from the manifest,
    and the token ``stream`` it belongs to (0 for single-process datasets; a merged ``llp-prep``
    array dataset numbers samples within each task's stream)."""

    path: str
    name: str
    samples: int
    stream: int = 0


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
        out.append(ShardInfo(str(p), s["name"], int(s["samples"]), int(s.get("stream") or 0)))
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


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of a dataset must be: ``seq_len + 1`` ids of ``dtype``, each ``< vocab``;
    ``verify_checksums``: also check the tokens' blake2b and the split index in the sample's json."""

    seq_len: int
    dtype: np.dtype
    vocab: int
    verify_checksums: bool = True

    @classmethod
    def from_manifest(cls, manifest: Dict, verify_checksums: bool = True) -> "SampleSpec":
        """From ``manifest.json``'s ``seq_len``, ``dtype`` and ``tokenizer.piece_count`` (the model's
        ``vocab_size`` is at least the piece count, checked by the config)."""
        try:
            return cls(int(manifest["seq_len"]), np.dtype(manifest["dtype"]),
                       int(manifest["tokenizer"]["piece_count"]), bool(verify_checksums))
        except (KeyError, TypeError, ValueError) as e:
            raise DataLayoutError(f"manifest.json lacks a valid seq_len, dtype or tokenizer.piece_count ({e!r}); "
                                  "rerun `llp-prep shard`") from None


def check_sample(sample: Dict, spec: SampleSpec, shard: str, index: Optional[int] = None) -> np.ndarray:
    """Validate one raw WebDataset sample (``{"__key__", "tokens.npy", "json", ...}`` of bytes) of
    shard ``shard`` against ``spec``; ``index`` is its expected position in its split (checked
    against the json's ``index`` when ``spec.verify_checksums``).

    Returns the tokens, a 1-D ``spec.dtype`` array of ``seq_len + 1`` ids. Raises
    :class:`CorruptDataError` (one line naming the shard and the sample) otherwise."""
    where = f"shard {shard} sample {sample.get('__key__')}"
    fix = "run `llp-prep verify` on the dataset, then re-create or restore the shard"
    raw = sample.get("tokens.npy")
    if not isinstance(raw, bytes):
        members = sorted(k for k in sample if not k.startswith("__"))
        raise CorruptDataError(f"{where}: has no tokens.npy (members: {members}); {fix}")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError, ... for damaged .npy bytes
        raise CorruptDataError(f"{where}: tokens.npy does not decode ({_first_line(e)}); {fix}") from None
    if arr.dtype != spec.dtype or arr.shape != (spec.seq_len + 1,):
        raise CorruptDataError(f"{where}: tokens.npy is {arr.dtype}{list(arr.shape)}, the manifest says "
                               f"{spec.dtype}[{spec.seq_len + 1}]; {fix}")
    top = int(arr.max(initial=0))
    if top >= spec.vocab:
        raise CorruptDataError(f"{where}: token id {top} >= vocabulary size {spec.vocab} (tokenizer.piece_count); "
                               f"{fix}")
    if spec.verify_checksums:
        _check_sample_json(sample.get("json"), arr, where, index, fix)
    return arr


def _check_sample_json(raw: Optional[bytes], arr: np.ndarray, where: str, index: Optional[int], fix: str) -> None:
    """The blake2b-128 of the token bytes and the split index that ``llp-prep shard`` wrote into the
    sample's json (``data_prep/shards.py``) match ``arr`` and ``index``."""
    try:
        meta = json.loads(raw.decode("utf-8")) if isinstance(raw, bytes) else None
    except (UnicodeDecodeError, ValueError):
        meta = "undecodable"
    if not isinstance(meta, dict) or not isinstance(meta.get("tokens_blake2b"), str):
        what = "no json" if raw is None else "a json that does not decode" if meta == "undecodable" else \
            "a json without tokens_blake2b"
        raise CorruptDataError(f"{where}: has {what}, so its checksum cannot be verified; {fix} "
                               "(data from another writer: set data.verify_checksums=false)")
    if hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest() != meta["tokens_blake2b"]:
        raise CorruptDataError(f"{where}: tokens differ from the checksum in its json (corrupted bytes); {fix}")
    if index is not None and meta.get("index") != index:
        raise CorruptDataError(f"{where}: json says index {meta.get('index')!r}, expected {index} from the manifest "
                               f"(samples reordered, duplicated or from another shard); {fix}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _warn(msg: str) -> None:
    print(f"[llp-pretrain] warning: {msg}", file=sys.stderr, flush=True)


def read_shard(shard: ShardInfo, spec: SampleSpec, on_corrupt: str = "fail", first_index: Optional[int] = None,
               counter: Optional[List[int]] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """The one way any loader reads a shard: yields ``("shard/key", tokens)`` for its samples in tar
    order, each checked by :func:`check_sample` (sample ``i`` is expected at split index
    ``first_index + i``), and checks the shard's sample count against the manifest when it ends.

    ``on_corrupt="fail"``: raises :class:`CorruptDataError` at the first bad sample, unreadable tar
    data (truncated, corrupt header, empty file) or wrong sample count. ``"skip"``: logs each (one
    line on stderr), adds the samples lost to ``counter[0]`` and yields only the good ones (at most
    the manifest's count)."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    n, last_key = 0, None

    def bad(msg: str, lost: int) -> None:
        if on_corrupt == "fail":
            raise CorruptDataError(msg)
        if counter is not None:
            counter[0] += lost
        _warn(f"{msg.split('; run `llp-prep')[0]}; skipped (data.on_corrupt=skip)")

    pipe = wds.DataPipeline(wds.SimpleShardList([shard.path]), wds.tarfile_to_samples())
    it = iter(pipe)
    while True:
        try:
            sample = next(it)
        except StopIteration:
            break
        except Exception as e:  # tarfile / webdataset / OS errors: the rest of the shard is unreadable
            after = f"after sample {last_key}" if last_key else "before its first sample"
            bad(f"shard {shard.name}: truncated or corrupt tar {after} ({_first_line(e)}); run `llp-prep verify` "
                "on the dataset, then re-create or restore the shard", max(0, shard.samples - n))
            return
        n += 1
        last_key = sample.get("__key__")
        if n > shard.samples:
            bad(f"shard {shard.name} sample {last_key}: the shard holds more than the {shard.samples} samples "
                f"the manifest lists; run `llp-prep verify` on the dataset", 0)
            continue
        try:
            arr = check_sample(sample, spec, shard.name, None if first_index is None else first_index + n - 1)
        except CorruptDataError as e:
            bad(str(e), 1)
            continue
        yield f"{shard.name}/{last_key}", arr
    if n < shard.samples:
        bad(f"shard {shard.name}: holds {n} samples but the manifest lists {shard.samples} (truncated tar or "
            f"corrupt header {'after sample ' + str(last_key) if last_key else 'before its first sample'}); run "
            "`llp-prep verify` on the dataset, then re-create or restore the shard",
            shard.samples - n)


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
        verify_checksums, on_corrupt: ``data.verify_checksums`` / ``data.on_corrupt`` (:func:`read_shard`).

    Yields ``{"tokens": LongTensor (micro_batch_size, seq_len + 1), "keys": [str], "skipped": int,
    "worker": int}`` (``skipped``: samples logical worker ``worker`` dropped as corrupt so far,
    ``on_corrupt="skip"``; the trainer sums the workers' latest counts), or,
    once, ``{"error": str}`` when the data is corrupt under ``on_corrupt="fail"``
    (:func:`make_train_loader`'s iterator raises it as :class:`CorruptDataError`).
    """

    def __init__(self, data_dir: str, dp_size: int, dp_rank: int, num_workers: int, micro_batch_size: int,
                 seed: int, shuffle_buffer: int = 1000, consumed_batches: int = 0, manifest: Optional[Dict] = None,
                 verify_checksums: bool = True, on_corrupt: str = "fail"):
        super().__init__()
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.data_dir = str(data_dir)
        self.manifest = manifest or read_manifest(data_dir)
        self.shards = list_shards(self.data_dir, "train", self.manifest)
        self.first_index = _first_indices(self.shards)
        self.spec = SampleSpec.from_manifest(self.manifest, verify_checksums)
        self.on_corrupt = on_corrupt
        self.skipped = [0]
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.requested_workers = num_workers
        self.num_workers = max(1, num_workers)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.consumed_batches = consumed_batches
        self.worker_shards = split_shards(self.shards, dp_size, dp_rank, num_workers)

    def epoch_samples(self, worker: int) -> int:
        """Samples one epoch of logical worker ``worker`` holds (sum of its shards' manifest counts)."""
        return sum(s.samples for s in self.worker_shards[worker])

    def checked_epoch(self, worker: int, epoch: int) -> Iterator[Tuple[str, np.ndarray]]:
        """Validated ``(key, tokens)`` of one epoch of one logical worker, in their final (shuffled)
        order: shards in an order shuffled by ``(seed, epoch, dp_rank, worker)``, each read by
        :func:`read_shard`, then a seeded shuffle buffer."""
        shards = list(self.worker_shards[worker])
        random.Random(derive_seed(self.seed, epoch, self.dp_rank, worker, "shards")).shuffle(shards)
        rng = random.Random(derive_seed(self.seed, epoch, self.dp_rank, worker, "buffer"))
        checked = (x for s in shards
                   for x in read_shard(s, self.spec, self.on_corrupt, self.first_index[s.name], self.skipped))
        return iter(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(checked))

    def worker_samples(self, worker: int, skip: int = 0) -> Iterator[Tuple[str, np.ndarray]]:
        """Infinite validated sample stream of a logical worker, starting after ``skip`` samples.

        Whole epochs are skipped by arithmetic: with ``on_corrupt="fail"`` an epoch holds the
        manifest's count; with ``"skip"`` it holds the count of good samples, the same in every epoch
        (same shards, same bytes), learnt by reading the first epoch when the skip reaches past it."""
        per_epoch = self.epoch_samples(worker)
        if per_epoch == 0:
            raise DataLayoutError(f"{self.data_dir}/manifest.json lists 0 samples for shards "
                                  f"{[s.name for s in self.worker_shards[worker]]}; rerun `llp-prep shard`")
        epoch, offset = divmod(skip, per_epoch) if self.on_corrupt == "fail" else (0, skip)
        while True:
            n = 0
            for n, sample in enumerate(self.checked_epoch(worker, epoch), start=1):
                if n > offset:
                    yield sample
            if n == 0:
                raise CorruptDataError(
                    f"every sample of shards {[s.name for s in self.worker_shards[worker]]} failed validation "
                    f"(data.on_corrupt=skip); run `llp-prep verify {self.data_dir}`")
            epoch, offset = epoch + 1, max(0, offset - n)
            if offset >= n:  # "skip" mode resuming past whole epochs: n good samples per epoch
                epoch, offset = epoch + offset // n, offset % n

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
            try:
                for _ in range(self.micro_batch_size):
                    k, a = next(stream)
                    keys.append(k)
                    arrays.append(a)
            except CorruptDataError as e:  # handed to the trainer process; a worker never raises it
                hint = " (or set data.on_corrupt=skip to train on without it)" if self.on_corrupt == "fail" else ""
                yield {"error": f"{e}{hint}"}
                return
            yield {"tokens": torch.from_numpy(np.stack(arrays).astype(np.int64)), "keys": keys,
                   "skipped": self.skipped[0], "worker": logical}


def _first_indices(shards: Sequence[ShardInfo]) -> Dict[str, int]:
    """Index of each shard's first sample within its stream: the manifest counts of the shards of
    the same stream before it (by name)."""
    out: Dict[str, int] = {}
    totals: Dict[int, int] = {}
    for s in shards:
        out[s.name] = totals.get(s.stream, 0)
        totals[s.stream] = out[s.name] + s.samples
    return out


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


class _CheckedIterator:
    """Iterator over a DataLoader's batches that raises a worker's ``{"error": ...}`` batch as
    :class:`CorruptDataError` in this process, after dropping the DataLoader iterator (its
    workers are shut down at once, not at interpreter exit)."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        if "error" in batch:
            self._it = None
            raise CorruptDataError(batch["error"])
        return batch


class CheckedDataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` whose iterators raise data errors from workers as
    :class:`CorruptDataError` (one line) in the calling process (:class:`_CheckedIterator`)."""

    def __iter__(self):
        return _CheckedIterator(super().__iter__())


def make_train_loader(stream: TrainStream) -> torch.utils.data.DataLoader:
    """A DataLoader over ``stream`` with ``data.num_workers`` worker processes (0 = in-process);
    batches pass through unchanged and are returned in worker round-robin order. Workers outlive a
    SIGTERM by a grace period and ignore SIGUSR1 (see :func:`_defer_stop_signals`). Corrupt data
    found by a worker is raised by ``next()`` as :class:`CorruptDataError` in this process."""
    workers = stream.requested_workers
    kwargs = dict(prefetch_factor=2, worker_init_fn=_defer_stop_signals) if workers else {}
    return CheckedDataLoader(stream, batch_size=None, num_workers=workers, **kwargs)


def iter_split_tokens(data_dir: str, split: str = "val", manifest: Optional[Dict] = None,
                      verify_checksums: bool = True) -> Iterator[np.ndarray]:
    """Samples of a split in stream order (shards by name, samples in tar order), each validated by
    :func:`read_shard` (policy ``fail``: a gap would break the stream).

    Yields 1-D arrays of ``seq_len + 1`` ids. Raises :class:`CorruptDataError` (one line)."""
    manifest = manifest or read_manifest(data_dir)
    shards = list_shards(data_dir, split, manifest)
    spec, first = SampleSpec.from_manifest(manifest, verify_checksums), _first_indices(shards)
    for shard in shards:
        for _, arr in read_shard(shard, spec, "fail", first[shard.name]):
            yield arr


def read_split_stream(data_dir: str, split: str = "val", manifest: Optional[Dict] = None,
                      max_samples: Optional[int] = None, verify_checksums: bool = True) -> np.ndarray:
    """Reassemble a split's token stream: ``concat(s0, s1[1:], s2[1:], ...)`` (consecutive samples
    share one boundary token, ``docs/internals.md``). Raises ``DataLayoutError`` if a boundary token
    does not match (shards out of order or corrupt), :class:`CorruptDataError` for a sample or
    shard that fails :func:`read_shard`'s checks. Returns a 1-D int64 array."""
    parts, prev = [], None
    for i, arr in enumerate(itertools.islice(iter_split_tokens(data_dir, split, manifest, verify_checksums),
                                             max_samples)):
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
