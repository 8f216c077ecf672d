"""Streaming WebDataset loader with one global, resumable sample order.

Order (``llp_pretrain.data_order``; ``docs/training.md``, "Data loading"): the samples of each
optimizer step are a function of the dataset(s), ``train.seed``, ``data.shuffle_buffer`` and
``train.global_batch_size`` only; not of ``data_parallel_size``, ``sequence_parallel_size`` or
``num_workers``.

* ``V`` virtual readers; train shard ``i`` of each source (sorted by name, from ``manifest.json``)
  belongs to reader ``i % V``. A reader streams its shards for ever, epoch after epoch (so every rank
  runs the same number of steps however uneven the shards are): in epoch ``e`` it visits them in an
  order shuffled by ``rng(seed, source, e, reader)`` and passes the samples through
  ``webdataset.shuffle`` with a buffer of ``ceil(shuffle_buffer / V)`` samples seeded from the same
  tuple (so a process holds about ``shuffle_buffer / dp`` samples in buffers, whatever ``V``). For a mixture
  (``data.sources``), each reader has one such stream per source and draws the source of its
  ``k``-th sample from ``data_order.source_choices``.
* Step ``s`` takes ``global_batch_size / V`` consecutive samples from every reader. Data-parallel
  rank ``r`` owns readers ``v % dp == r`` (``dp`` must divide ``V``); sequence-parallel peers share a
  ``dp_rank`` and read the same samples. DataLoader workers split a rank's readers among themselves
  and deliver one item per step; :class:`StepBatches` joins them in reader order and cuts the rank's
  share into micro-batches, the same for any ``num_workers``.
* Resume at data position ``s``: every reader skips ``s * global_batch_size / V`` samples (per
  source: whole epochs by arithmetic from the manifest's counts, the rest by reading them).

Samples are ``tokens.npy`` arrays of ``seq_len + 1`` ids (``docs/internals.md``); micro-batches are
``{"tokens": LongTensor (B, seq_len + 1), "keys": list of "shard/key" strings, "skipped": int,
"step": int}`` (keys ``name/shard/key`` for ``data.sources``).

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
from llp_pretrain.data_order import (MIX_CHUNK, data_layout_problem, derive_seed, rank_readers,
                                     resolve_virtual_readers, source_choices, source_counts)
from llp_pretrain.remote import ShardFetchError, file_url, is_url, open_url_samples

__all__ = [
    "DataLayoutError",
    "CorruptDataError",
    "SampleSpec",
    "check_sample",
    "read_shard",
    "ShardInfo",
    "list_shards",
    "TrainSource",
    "train_sources",
    "TrainStream",
    "StepBatches",
    "TrainLoader",
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
    """One shard of a split: absolute ``path`` (or URL, ``llp_pretrain.remote``), its ``name`` and
    ``samples`` count from the manifest, the token ``stream`` it belongs to (0 for single-process
    datasets; a merged ``llp-prep`` array dataset numbers samples within each task's stream) and
    its size in ``bytes`` from the manifest (None if unknown)."""

    path: str
    name: str
    samples: int
    stream: int = 0
    bytes: Optional[int] = None


def list_shards(data_dir: str, split: str, manifest: Optional[Dict] = None) -> List[ShardInfo]:
    """Shards of ``split`` (``train``/``val``) in stream order (by name), from ``manifest.json``;
    ``data_dir`` may be a URL prefix (``llp_pretrain.remote``: shards are then fetched when read).

    Raises ``DataLayoutError`` when the split has no shards or a listed shard file is missing."""
    manifest = manifest or read_manifest(data_dir)
    out = []
    for s in manifest.get("shards", []):
        if s.get("split") != split:
            continue
        if is_url(data_dir):
            out.append(ShardInfo(file_url(data_dir, s["name"]), s["name"], int(s["samples"]),
                                 int(s.get("stream") or 0), s.get("bytes")))
            continue
        p = Path(data_dir) / s["name"]
        if not p.is_file():
            raise DataLayoutError(f"{p}: listed in {Path(data_dir) / 'manifest.json'} but missing; "
                                  "re-run `llp-prep shard` or restore the file")
        out.append(ShardInfo(str(p), s["name"], int(s["samples"]), int(s.get("stream") or 0), s.get("bytes")))
    if not out:
        raise DataLayoutError(f"{data_dir}/manifest.json: no '{split}' shards")
    return sorted(out, key=lambda s: s.name)


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
    the manifest's count). A shard at a URL that cannot be fetched after the retries raises
    ``llp_pretrain.remote.ShardFetchError`` under either policy."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    n, last_key = 0, None

    def bad(msg: str, lost: int) -> None:
        if on_corrupt == "fail":
            raise CorruptDataError(msg)
        if counter is not None:
            counter[0] += lost
        _warn(f"{msg.split('; run `llp-prep')[0]}; skipped (data.on_corrupt=skip)")

    if is_url(shard.path):
        it = open_url_samples(shard.path, shard.bytes)
    else:
        it = iter(wds.DataPipeline(wds.SimpleShardList([shard.path]), wds.tarfile_to_samples()))
    while True:
        try:
            sample = next(it)
        except StopIteration:
            break
        except ShardFetchError as e:  # unreachable, not corrupt: never skipped
            raise ShardFetchError(e.message) from None
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


@dataclass(frozen=True)
class TrainSource:
    """One dataset of the training data: ``data.path`` (name ``""``: keys are ``shard/key``) or one
    entry of ``data.sources`` (keys are ``name/shard/key``); ``weight`` > 0 (normalised over sources);
    ``manifest``: its ``manifest.json`` when already read."""

    name: str
    path: str
    weight: float = 1.0
    manifest: Optional[Dict] = None


def train_sources(cfg) -> List[TrainSource]:
    """The :class:`TrainSource` s of a run config: ``data.path`` (unprefixed keys) or ``data.sources``."""
    if cfg.data.sources:
        return [TrainSource(s.name, s.path, s.weight) for s in cfg.data.sources]
    return [TrainSource("", cfg.data.path, 1.0, cfg.manifest)]


class TrainStream(torch.utils.data.IterableDataset):
    """The training samples of one data-parallel rank in the global order of ``llp_pretrain.data_order``.

    Args:
        sources: a dataset directory, or a list of :class:`TrainSource` (a weighted mixture).
        global_batch_size, micro_batch_size: samples per optimizer step (all ranks) / per micro-batch.
        dp_size, dp_rank: data-parallel layout (``dp_rank = rank // sequence_parallel_size``).
        num_workers: DataLoader workers (0 = in-process); any number gives the same batches.
        seed, shuffle_buffer: ``train.seed`` and the samples held in shuffle buffers over all virtual
            readers (each reader's buffer holds ``ceil(shuffle_buffer / V)``).
        start_step: data position (optimizer steps already read from this data; resume).
        virtual_readers: ``data.virtual_readers`` (None: derived, ``data_order.resolve_virtual_readers``).
        verify_checksums, on_corrupt: ``data.verify_checksums`` / ``data.on_corrupt`` (:func:`read_shard`).

    Raises :class:`DataLayoutError` up front when ``dp_size`` does not divide the readers, the batch
    sizes disagree, or the sources disagree on ``seq_len``. Iterating (in a DataLoader worker)
    yields one item per step for the worker's share of the rank's readers:
    ``{"step", "readers": [v], "tokens": LongTensor (n, seq_len + 1), "keys": [str], "skipped": int}``,
    or once ``{"error": str}`` (corrupt data under ``on_corrupt="fail"``); :func:`make_train_loader`
    regroups them into micro-batches.
    """

    def __init__(self, sources, global_batch_size: int, micro_batch_size: int, dp_size: int = 1, dp_rank: int = 0,
                 num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000, start_step: int = 0,
                 virtual_readers: Optional[int] = None, verify_checksums: bool = True, on_corrupt: str = "fail"):
        super().__init__()
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.sources = [TrainSource("", str(sources))] if isinstance(sources, (str, os.PathLike)) else list(sources)
        manifests = [s.manifest or read_manifest(s.path) for s in self.sources]
        self.shards = [list_shards(s.path, "train", m) for s, m in zip(self.sources, manifests)]
        self.first_index = [_first_indices(sh) for sh in self.shards]
        self.specs = [SampleSpec.from_manifest(m, verify_checksums) for m in manifests]
        if len({sp.seq_len for sp in self.specs}) > 1:
            raise DataLayoutError("data sources differ in seq_len: " + ", ".join(
                f"{s.name or s.path}: {sp.seq_len}" for s, sp in zip(self.sources, self.specs)))
        self.weights = [float(s.weight) for s in self.sources]
        self.on_corrupt, self.skipped = on_corrupt, [0]
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.requested_workers = num_workers
        self.seed, self.shuffle_buffer, self.start_step = seed, shuffle_buffer, start_step
        counts = [len(sh) for sh in self.shards]
        problem = data_layout_problem(global_batch_size, counts, dp_size, virtual_readers)
        if problem:
            raise DataLayoutError(problem)
        self.virtual_readers = resolve_virtual_readers(global_batch_size, counts, virtual_readers)
        self.per_reader = global_batch_size // self.virtual_readers  # samples per reader per step
        self.reader_buffer = -(-shuffle_buffer // self.virtual_readers)
        if (global_batch_size // dp_size) % micro_batch_size:
            raise DataLayoutError(f"global_batch_size {global_batch_size} / data_parallel_size {dp_size} is not a "
                                  f"multiple of micro_batch_size {micro_batch_size}")
        self.readers = rank_readers(self.virtual_readers, dp_size, dp_rank)
        v_count = self.virtual_readers
        self.reader_shards = [[[s for i, s in enumerate(sh) if i % v_count == v] for v in range(v_count)]
                              for sh in self.shards]

    def key(self, source: int, key: str) -> str:
        """The consumed-log key of a sample: ``shard/key``, prefixed ``name/`` for ``data.sources``."""
        name = self.sources[source].name
        return f"{name}/{key}" if name else key

    def epoch_samples(self, source: int, reader: int) -> int:
        """Samples one epoch of ``reader``'s shards of ``source`` holds (manifest counts)."""
        return sum(s.samples for s in self.reader_shards[source][reader])

    def checked_epoch(self, source: int, reader: int, epoch: int) -> Iterator[Tuple[str, np.ndarray]]:
        """Validated ``(key, tokens)`` of one epoch of ``reader``'s shards of ``source`` in their final
        order: shards shuffled by ``(seed, source, epoch, reader)``, each read by :func:`read_shard`,
        then a ``webdataset.shuffle`` buffer seeded by the same tuple."""
        shards = list(self.reader_shards[source][reader])
        random.Random(derive_seed(self.seed, source, epoch, reader, "shards")).shuffle(shards)
        rng = random.Random(derive_seed(self.seed, source, epoch, reader, "buffer"))
        spec, first = self.specs[source], self.first_index[source]
        checked = (x for s in shards for x in read_shard(s, spec, self.on_corrupt, first[s.name], self.skipped))
        return iter(wds.shuffle(self.reader_buffer, initial=self.reader_buffer, rng=rng)(checked))

    def source_samples(self, source: int, reader: int, skip: int = 0) -> Iterator[Tuple[str, np.ndarray]]:
        """Endless validated stream of ``reader``'s shards of ``source``, after ``skip`` samples.

        Whole epochs are skipped by arithmetic: with ``on_corrupt="fail"`` an epoch holds the
        manifest's count; with ``"skip"`` it holds the count of good samples, the same in every epoch
        (same shards, same bytes), learnt by reading the first epoch when the skip reaches past it."""
        names = [s.name for s in self.reader_shards[source][reader]]
        per_epoch = self.epoch_samples(source, reader)
        if per_epoch == 0:
            raise DataLayoutError(f"{self.sources[source].path}/manifest.json lists 0 samples for shards {names}; "
                                  "rerun `llp-prep shard`")
        epoch, offset = divmod(skip, per_epoch) if self.on_corrupt == "fail" else (0, skip)
        while True:
            n = 0
            for n, sample in enumerate(self.checked_epoch(source, reader, epoch), start=1):
                if n > offset:
                    yield sample
            if n == 0:
                raise CorruptDataError(f"every sample of shards {names} failed validation (data.on_corrupt=skip); "
                                       f"run `llp-prep verify {self.sources[source].path}`")
            epoch, offset = epoch + 1, max(0, offset - n)
            if offset >= n:  # "skip" mode resuming past whole epochs: n good samples per epoch
                epoch, offset = epoch + offset // n, offset % n

    def reader_samples(self, reader: int, start: int) -> Iterator[Tuple[str, np.ndarray]]:
        """Endless stream of virtual reader ``reader`` from its sample ``start``: its ``k``-th sample
        comes from source ``data_order.source_choices(...)[k]``, the next one of that source's stream."""
        skips = source_counts(self.seed, self.weights, reader, start)
        streams: Dict[int, Iterator] = {}
        k = start
        while True:
            chunk, pos = divmod(k, MIX_CHUNK)
            for j in source_choices(self.seed, self.weights, reader, chunk)[pos:]:
                j = int(j)
                if j not in streams:  # opened lazily: a source a reader never draws is never read
                    streams[j] = self.source_samples(j, reader, int(skips[j]))
                key, arr = next(streams[j])
                yield self.key(j, key), arr
            k = (chunk + 1) * MIX_CHUNK

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.readers[worker::workers]
        c = self.per_reader
        streams = [self.reader_samples(v, self.start_step * c) for v in mine]
        step = self.start_step
        while True:
            keys, arrays = [], []
            try:
                for stream in streams:
                    for _ in range(c):
                        k, a = next(stream)
                        keys.append(k)
                        arrays.append(a)
            except (CorruptDataError, ShardFetchError) as e:  # handed to the trainer process; a worker never raises it
                hint = " (or set data.on_corrupt=skip to train on without it)" \
                    if self.on_corrupt == "fail" and isinstance(e, CorruptDataError) else ""
                yield {"error": f"{e}{hint}"}
                return
            tokens = (torch.from_numpy(np.stack(arrays).astype(np.int64)) if arrays
                      else torch.empty((0, self.specs[0].seq_len + 1), dtype=torch.int64))
            yield {"step": step, "readers": mine, "tokens": tokens, "keys": keys, "skipped": self.skipped[0]}
            step += 1

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


class StepBatches:
    """Iterator over a rank's micro-batches, built from the per-step items of a :class:`TrainStream`'s
    DataLoader workers (returned round-robin, one item per worker per step): the items of step ``s``
    are joined in reader order and cut into ``micro_batch_size`` rows, so the micro-batches are the
    same for any ``num_workers``. A worker's ``{"error": ...}`` item is raised as
    :class:`CorruptDataError` here, after dropping the DataLoader iterator (its workers stop now).

    Yields ``{"tokens": LongTensor (micro_batch_size, seq_len + 1), "keys": [str], "skipped": int,
    "step": int}``; ``step_keys`` holds the keys of the last step started (the rank's share of that
    step's global batch, in order)."""

    def __init__(self, it, stream: TrainStream, workers: int):
        self._it, self.stream, self.workers = it, stream, max(1, workers)
        self.step = stream.start_step
        self.step_keys: List[str] = []
        self._queue: List[Dict] = []

    def __iter__(self):
        return self

    def _next_item(self) -> Dict:
        item = next(self._it)
        if "error" in item:
            self._it = None
            raise CorruptDataError(item["error"])
        if item["step"] != self.step:  # the round-robin contract of torch's DataLoader broke
            raise RuntimeError(f"data loader out of order: got step {item['step']} while assembling {self.step}")
        return item

    def _fill(self) -> None:
        items = [self._next_item() for _ in range(self.workers)]
        c = self.stream.per_reader
        rows: Dict[int, Tuple[List[str], torch.Tensor]] = {}
        for item in items:
            for i, v in enumerate(item["readers"]):
                rows[v] = (item["keys"][i * c:(i + 1) * c], item["tokens"][i * c:(i + 1) * c])
        order = self.stream.readers
        keys = [k for v in order for k in rows[v][0]]
        tokens = torch.cat([rows[v][1] for v in order])
        skipped = sum(item["skipped"] for item in items)
        mb = self.stream.micro_batch_size
        self._queue = [{"tokens": tokens[i:i + mb], "keys": keys[i:i + mb], "skipped": skipped, "step": self.step}
                       for i in range(0, len(keys), mb)]
        self.step_keys = keys
        self.step += 1

    def __next__(self) -> Dict:
        if self._it is None:
            raise StopIteration
        if not self._queue:
            self._fill()
        return self._queue.pop(0)


class TrainLoader:
    """Iterable of a rank's training micro-batches (:class:`StepBatches`) over a DataLoader with
    ``data.num_workers`` worker processes (0 = in-process)."""

    def __init__(self, stream: TrainStream):
        self.stream = stream
        workers = stream.requested_workers
        kwargs = dict(prefetch_factor=2, worker_init_fn=_defer_stop_signals) if workers else {}
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, **kwargs)

    def __iter__(self) -> StepBatches:
        return StepBatches(iter(self.loader), self.stream, self.stream.requested_workers)


def make_train_loader(stream: TrainStream) -> TrainLoader:
    """The training loader of ``stream``: iterating it gives micro-batches (:class:`StepBatches`).
    Workers outlive a SIGTERM by a grace period and ignore SIGUSR1 (see :func:`_defer_stop_signals`).
    Corrupt data found by a worker is raised by ``next()`` as :class:`CorruptDataError` in this process."""
    return TrainLoader(stream)


def iter_split_tokens(data_dir: str, split: str = "val", manifest: Optional[Dict] = None,
                      verify_checksums: bool = True) -> Iterator[np.ndarray]:
    """Samples of a split in stream order (shards by name, samples in tar order), each validated by
    :func:`read_shard` (policy ``fail``: a gap would break the stream).

    Yields 1-D arrays of ``seq_len + 1`` ids. Raises :class:`CorruptDataError` (one line)."""
    for _, arr in _split_samples(data_dir, split, manifest, verify_checksums):
        yield arr


def _split_samples(data_dir: str, split: str, manifest: Optional[Dict], verify_checksums: bool
                   ) -> Iterator[Tuple[int, np.ndarray]]:
    """``(stream, tokens)`` of every sample of a split in stream order (:func:`iter_split_tokens`)."""
    manifest = manifest or read_manifest(data_dir)
    shards = list_shards(data_dir, split, manifest)
    spec, first = SampleSpec.from_manifest(manifest, verify_checksums), _first_indices(shards)
    for shard in shards:
        for _, arr in read_shard(shard, spec, "fail", first[shard.name]):
            yield shard.stream, arr


def read_split_stream(data_dir: str, split: str = "val", manifest: Optional[Dict] = None,
                      max_samples: Optional[int] = None, verify_checksums: bool = True) -> np.ndarray:
    """Reassemble a split's token stream: ``concat(s0, s1[1:], s2[1:], ...)`` (consecutive samples
    of a stream share one boundary token, ``docs/internals.md``). The train split of a merged
    ``llp-prep`` array dataset holds several streams (the shards' ``stream``): they are
    concatenated whole, in shard order, each one starting with its first sample's first token.
    Raises ``DataLayoutError`` if a boundary token does not match (shards out of order or corrupt),
    :class:`CorruptDataError` for a sample or shard that fails :func:`read_shard`'s checks. Returns
    a 1-D int64 array."""
    parts, prev, prev_stream = [], None, None
    for i, (stream, arr) in enumerate(itertools.islice(_split_samples(data_dir, split, manifest, verify_checksums),
                                                       max_samples)):
        arr = arr.astype(np.int64)
        if prev is None or stream != prev_stream:
            parts.append(arr)
        else:
            if arr[0] != prev[-1]:
                raise DataLayoutError(f"{data_dir}: {split} sample {i} does not start with the previous sample's "
                                      "last token; shards are out of order or corrupt (`llp-prep verify`)")
            parts.append(arr[1:])
        prev, prev_stream = arr, stream
    if not parts:
        raise DataLayoutError(f"{data_dir}: split '{split}' is empty")
    return np.concatenate(parts)
