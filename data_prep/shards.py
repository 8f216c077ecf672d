"""Tokenizing documents and packing them into WebDataset shards (``llp-prep shard``).

Pipeline: the main process reads documents (``data_prep.inputs``) and cuts them into batches of
about ``BATCH_CHARS`` characters; ``workers`` processes encode batches with SentencePiece (at most
``2 * workers + 1`` batches in flight, results consumed in submission order, so memory is bounded and
the output does not depend on ``workers``); the main process appends EOS after each document,
packs each split's token stream into samples of ``seq_len + 1`` tokens that share one boundary token
(``docs/internals.md``) and writes them as WebDataset tars (``tarwriter.SampleTarWriter``: the bytes of
``webdataset.TarWriter``, without importing torch) to ``NAME.partial`` files that
are renamed when complete. ``manifest.json`` is written last.
"""
from __future__ import annotations

import array
import hashlib
import io
import json
import os
import shutil
from collections import deque
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence

import numpy as np

from .errors import SKIP_KINDS, DataPrepError, SkipCounter
from .inputs import PIECE_CHARS, ReadOptions, discover, iter_documents, warn
from .manifest import (FORMAT_VERSION, MANIFEST, PARTIAL_SUFFIX, RUN_MARKER, SHARD_RE, SPLITS,
                       ensure_dir, fingerprint, sample_key, shard_name, strip_execution_only,
                       write_atomic, write_json_atomic)
from .progress import Progress
from .tarwriter import SampleTarWriter
from .tokenizer import load_tokenizer, model_file, special_ids

DEFAULT_SAMPLES_PER_SHARD = 10_000
BATCH_CHARS = 1 << 20
BATCH_MAX_PIECES = 8192
TAR_MTIME = 0                # fixed member mtime: reproducible tars (an int: a float forces PAX headers)
SP_SPACE_SYMBOL = "\u2581"    # SentencePiece's escaped space: in input text it decodes as " "
NOT_RECORDED = ("--workers", "--parallel", "--quiet", "--overwrite", "--task-index")
TOKENIZER_COPY = "tokenizer.model"   # the dataset's own copy of the model it was encoded with
SPLIT_METHOD = "blake2b-64 of 'seed\\0identity\\0ordinal' / 2**64 < val_fraction -> val"


def split_of(identity: str, ordinal: int, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` or ``"train"`` for a document, from its identity only (source identity + ordinal
    within the source), so a document lands in the same split whatever else is in the corpus."""
    if val_fraction <= 0.0:
        return "train"
    h = hashlib.blake2b(f"{seed}\0{identity}\0{ordinal}".encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(h, "big") / 2.0 ** 64 < val_fraction else "train"


def token_dtype(piece_count: int) -> np.dtype:
    """``uint16`` if every id fits (``piece_count <= 65536``), else ``uint32``."""
    return np.dtype(np.uint16) if piece_count <= 1 << 16 else np.dtype(np.uint32)


def npy_header(length: int, dtype: np.dtype) -> bytes:
    """The ``.npy`` header of a 1-D array of ``length`` items of ``dtype`` (what ``np.save`` writes)."""
    b = io.BytesIO()
    np.lib.format.write_array(b, np.zeros(length, dtype=dtype), allow_pickle=False)
    return b.getvalue()[: -length * dtype.itemsize]


# ----------------------------------------------------------------------------- workers
_SP = None
_BYTE_RANGE = (4, 259)
_BYTE_TABLE: Optional[np.ndarray] = None   # when the byte pieces are not one contiguous range
_EOS = _UNK = -1


def _init_worker(model_path: str) -> None:
    global _SP, _BYTE_RANGE, _BYTE_TABLE, _EOS, _UNK
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model_path)
    _EOS, _UNK = int(_SP.eos_id()), int(_SP.unk_id())
    byte_ids = [i for i in range(_SP.get_piece_size()) if _SP.is_byte(i)]
    _BYTE_RANGE = (min(byte_ids), max(byte_ids)) if byte_ids else (1, 0)
    _BYTE_TABLE = None
    if byte_ids and max(byte_ids) - min(byte_ids) + 1 != len(byte_ids):
        _BYTE_TABLE = np.zeros(_SP.get_piece_size(), dtype=bool)
        _BYTE_TABLE[byte_ids] = True


def _encode_batch(texts: List[str], lasts: List[bool]):
    """Encode a batch of document pieces; EOS is appended after each document's last piece.

    Returns ``(flat uint32 tokens, tokens per piece, UTF-8 bytes per piece, unk ids per piece,
    byte-fallback ids per piece, count of U+2581 characters in the batch)``.
    """
    ids = _SP.encode(texts, num_threads=1)
    for t, last in zip(ids, lasts):
        if last:
            t.append(_EOS)
    ntok = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
    # array.fromlist per list is several times faster than np.array over a flattened list
    buf = array.array("I")
    for t in ids:
        buf.fromlist(t)
    arr = np.frombuffer(buf, dtype=np.uint32)
    # str.isascii() is O(1) in CPython: ASCII pieces need no UTF-8 encode to count their bytes
    nbytes = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts),
                         dtype=np.int64, count=len(texts))
    ends = np.cumsum(ntok)
    lo, hi = _BYTE_RANGE
    # unk and byte-fallback ids are rare: find their positions, then the pieces they fall in
    n_unk = _per_piece(np.flatnonzero(arr == _UNK), ends)
    is_byte = (_BYTE_TABLE[arr] if _BYTE_TABLE is not None
               else (arr - np.uint32(lo)) <= np.uint32(hi - lo))
    n_byte = _per_piece(np.flatnonzero(is_byte), ends)
    n_space_symbol = sum(t.count(SP_SPACE_SYMBOL) for t in texts if not t.isascii())
    return arr, ntok, nbytes, n_unk, n_byte, n_space_symbol


def _per_piece(positions: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """How many of the token ``positions`` fall in each piece (pieces end at ``ends``)."""
    return np.bincount(np.searchsorted(ends, positions, side="right"),
                       minlength=len(ends))[: len(ends)]


# ----------------------------------------------------------------------------- writing
class _HashingFile:
    """File wrapper that sha256-hashes everything written through it (tarfile stream mode only
    calls ``write``)."""

    def __init__(self, f) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0
        self.abandoned = False   # set on abort: a tarfile finalizer flushing later writes nothing

    def write(self, b) -> int:
        if self.abandoned:
            return len(b)
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()


def _named(e: OSError, path) -> OSError:
    """``e`` with ``filename`` set when the failed call did not say (a ``write`` on a full disk)."""
    if e.filename is None and path is not None:
        e.filename = str(path)
    return e


class _ShardSink:
    """Writes one split's samples into ``SPLIT-NNNNNN.tar`` shards of ``samples_per_shard``."""

    def __init__(self, out: Path, split: str, samples_per_shard: int, seq_len: int) -> None:
        self.out, self.split, self.k_per = out, split, samples_per_shard
        self.seq_len = seq_len
        self.stream: Optional[int] = None
        self.first_index = 0        # shard names start here (a merge continues a numbering)
        self.shards: List[Dict] = []
        self._tw = self._file = self._hf = None
        self._n = 0
        self._tmp: Optional[Path] = None

    def _open(self) -> None:
        name = shard_name(self.split, self.first_index + len(self.shards))
        self._tmp = self.out / (name + PARTIAL_SUFFIX)
        self._file = open(self._tmp, "wb")
        self._hf = _HashingFile(self._file)
        # the bytes of webdataset.TarWriter (USTAR headers), without importing webdataset (and torch)
        self._tw = SampleTarWriter(self._hf, mtime=TAR_MTIME, user="llp", group="llp", mode=0o444)
        self._n = 0

    def write(self, key: str, npy: bytes, meta: bytes) -> None:
        try:
            if self._tw is None:
                self._open()
            self._tw.write(key, {"tokens.npy": npy, "json": meta})
        except OSError as e:
            raise _named(e, self._tmp or self.out)
        self._n += 1
        if self._n == self.k_per:
            self.close_current()

    def close_current(self) -> None:
        if self._tw is None:
            return
        try:
            self._tw.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            raise _named(e, self._tmp)
        name = shard_name(self.split, self.first_index + len(self.shards))
        os.replace(self._tmp, self.out / name)
        entry = {"name": name, "split": self.split, "samples": self._n,
                 "tokens": self._n * (self.seq_len + 1), "bytes": self._hf.n,
                 "sha256": self._hf.h.hexdigest()}
        if self.stream is not None:
            entry["stream"] = self.stream
        self.shards.append(entry)
        self._tw = self._file = self._hf = self._tmp = None

    def abort(self) -> None:
        if self._hf is not None:
            self._hf.abandoned = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError:     # flushing the rest fails too on a full disk: the first error counts
                pass
            finally:
                if self._tmp is not None and self._tmp.exists():
                    self._tmp.unlink()
        self._tw = self._file = self._hf = self._tmp = None


class _SplitPacker:
    """Packs one split's token stream into samples of ``seq_len + 1`` tokens.

    Sample ``k`` holds stream tokens ``[k*seq_len, k*seq_len + seq_len + 1)``; its ``json`` lists
    ``[doc_id, token offset in the document, token count]`` for every document it overlaps, and
    the blake2b-128 of its ``tokens.npy`` bytes (so ``verify`` can name a corrupted sample).
    """

    def __init__(self, split: str, seq_len: int, dtype: np.dtype, sink: _ShardSink,
                 stream: Optional[int] = None) -> None:
        self.split, self.L, self.dtype, self.sink = split, seq_len, dtype, sink
        self.stream = stream
        sink.stream = stream
        self.header = npy_header(seq_len + 1, dtype)
        self.buf = np.empty(0, dtype=dtype)
        self.buf_start = 0
        self.pending: List[np.ndarray] = []
        self.segs: Deque[List[int]] = deque()   # [stream_start, stream_end, doc_id, doc_offset]
        self.stream_len = 0
        self.samples = 0
        self.documents = self.text_bytes = self.unk = self.byte_fallback = 0

    def add(self, doc_id: int, doc_offset: int, tokens: np.ndarray) -> None:
        n = len(tokens)
        if n == 0:
            return
        if self.segs and self.segs[-1][2] == doc_id and self.segs[-1][1] == self.stream_len:
            self.segs[-1][1] += n
        else:
            self.segs.append([self.stream_len, self.stream_len + n, doc_id, doc_offset])
        self.pending.append(tokens)
        self.stream_len += n

    def emit(self) -> None:
        L = self.L
        n_complete = (self.stream_len - 1) // L if self.stream_len > L else 0
        if n_complete <= self.samples:
            return
        if self.pending:
            self.buf = np.concatenate([self.buf] + [p.astype(self.dtype, copy=False)
                                                    for p in self.pending])
            self.pending = []
        for k in range(self.samples, n_complete):
            lo = k * L
            hi = lo + L + 1
            s = lo - self.buf_start
            sample = self.buf[s:s + L + 1]
            while self.segs and self.segs[0][1] <= lo:
                self.segs.popleft()
            docs = []
            for st, en, doc_id, off in self.segs:
                if st >= hi:
                    break
                a, b = max(st, lo), min(en, hi)
                docs.append([doc_id, off + (a - st), b - a])
            data = sample.tobytes()
            meta = {"split": self.split, "index": k, "docs": docs,
                    "tokens_blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
            if self.stream is not None:
                meta["stream"] = self.stream
            self.sink.write(sample_key(self.split, k, self.stream), self.header + data,
                            json.dumps(meta, separators=(",", ":")).encode("utf-8"))
        self.samples = n_complete
        cut = n_complete * L - self.buf_start
        self.buf = self.buf[cut:].copy()
        self.buf_start = n_complete * L

    def tail(self):
        """The stream tokens after the last complete sample, and their ``[doc_id, doc_offset,
        count]`` segments (call after the final ``emit``): what a merge packs into the tail
        stream."""
        start = self.samples * self.L + 1 if self.samples else 0
        if self.pending:
            self.buf = np.concatenate([self.buf] + [p.astype(self.dtype, copy=False)
                                                    for p in self.pending])
            self.pending = []
        tokens = self.buf[start - self.buf_start:]
        segs = [[doc_id, off + max(0, start - st), en - max(st, start)]
                for st, en, doc_id, off in self.segs if en > start]
        return tokens, segs

    def totals(self) -> Dict:
        covered = self.samples * self.L + 1 if self.samples else 0
        return {
            "documents": self.documents,
            "samples": self.samples,
            "tokens": self.samples * (self.L + 1),
            "stream_tokens": covered,
            "text_bytes": self.text_bytes,
            "text_tokens": self.stream_len,
            "dropped_tail_tokens": self.stream_len - covered,
            "unk_tokens": self.unk,
            "byte_fallback_tokens": self.byte_fallback,
            "shards": len(self.sink.shards),
        }


# ----------------------------------------------------------------------------- output dir
def copy_tokenizer(model_path: Path, out: Path) -> None:
    """Copy the model to ``out/tokenizer.model`` (temporary name, fsync, rename), so a dataset
    directory carries the tokenizer it was encoded with, whatever the working directory later."""
    dst = out / TOKENIZER_COPY
    if dst.exists() and os.path.samefile(dst, model_path):
        return
    with open(model_path, "rb") as src:
        write_atomic(dst, lambda f: shutil.copyfileobj(src, f))


def _existing_fingerprint(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
    except Exception:
        return "<unreadable>"


def _prepare_out_dir(out: Path, fp: str, overwrite: bool, settings: Dict) -> str:
    """Refuse a directory holding a different dataset (unless ``overwrite``), then clear what an
    earlier run of this dataset left (manifest first, then shards and partial files) and mark the
    run as unfinished. Returns what was found, for the log."""
    manifest, marker = out / MANIFEST, out / RUN_MARKER
    ours = [p for p in out.iterdir()
            if SHARD_RE.match(p.name) or p.name.endswith(".tar" + PARTIAL_SUFFIX)]
    found = "empty"
    if manifest.exists():
        old = _existing_fingerprint(manifest)
        found = "same dataset (redoing it)" if old == fp else "a different dataset"
    elif marker.exists():
        old = _existing_fingerprint(marker)
        found = ("an unfinished run of the same dataset (redoing it)" if old == fp
                 else "an unfinished run of a different dataset")
    elif ours:
        old, found = None, "shards without a manifest"
    else:
        old = fp
    if old != fp and not overwrite:
        raise DataPrepError(
            f"output directory {out} holds {found} ({len(ours)} shard files; fingerprint "
            f"{str(old)[:12]} vs {fp[:12]} for this command); pass --overwrite to replace it, or "
            f"choose another --out")
    write_json_atomic(marker, {"fingerprint": fp, "settings": settings})
    if manifest.exists():
        manifest.unlink()
    for p in ours:
        p.unlink()
    return found


# ----------------------------------------------------------------------------- API
MAX_SEQ_LEN = 1 << 24          # tokens; one sample (seq_len + 1 ids) is held in memory several times
MAX_WORKERS_PER_CPU = 4


def _check_settings(seq_len, val_fraction, samples_per_shard, workers, parallel, num_tasks,
                    task_index) -> None:
    """Raise ``DataPrepError`` naming the first option out of range."""
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise DataPrepError(f"--seq-len must be in [1, {MAX_SEQ_LEN}], got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataPrepError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if samples_per_shard < 1:
        raise DataPrepError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    max_workers = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    if not 0 <= workers <= max_workers:
        raise DataPrepError(f"--workers must be in [0, {max_workers}] ({MAX_WORKERS_PER_CPU} per CPU: more "
                            f"only add overhead), got {workers}")
    if parallel not in ("processes", "threads"):
        raise DataPrepError(f"--parallel {parallel!r}: choose processes or threads")
    if (num_tasks is None) != (task_index is None):
        raise DataPrepError("--num-tasks and --task-index go together (in a SLURM array both "
                            "default to SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID)")
    if num_tasks is not None and not (num_tasks >= 1 and 0 <= task_index < num_tasks):
        raise DataPrepError(f"--task-index {task_index} is not in [0, --num-tasks {num_tasks})")


def build_shards(inputs: Sequence[str], tokenizer: os.PathLike, out_dir: os.PathLike, *,
                 seq_len: int = 2048, val_fraction: float = 0.005,
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, workers: int = 1,
                 read_options: Optional[ReadOptions] = None, split_seed: int = 0,
                 overwrite: bool = False, quiet: bool = True, parallel: str = "processes",
                 argv: Optional[List[str]] = None, num_tasks: Optional[int] = None,
                 task_index: Optional[int] = None) -> Dict:
    """Tokenize ``inputs`` and write ``out_dir/{train,val}-NNNNNN.tar`` + ``manifest.json``.

    Args:
        inputs: files or directories (text, JSONL or Parquet; text and JSONL optionally
            gzip/xz/zstd/bz2).
        tokenizer: a SentencePiece model (or a directory holding ``tokenizer.model``): ours from
            ``train_tokenizer``, or any model with an EOS piece (its own special ids are used and
            recorded).
        seq_len: model context in tokens; every sample holds ``seq_len + 1`` token ids.
        val_fraction: expected fraction of documents (by identity hash) in the val split.
        samples_per_shard: samples per tar (the last shard of a split may hold fewer).
        workers: encoding processes; the calling process reads, packs and writes meanwhile
            (0 = encode in the calling process too). Never changes the output.
        read_options: document reading options (``doc_sep``, ``text_key``, ``errors``, ...).
        split_seed: salt of the split hash.
        parallel: ``"processes"`` (default) or ``"threads"``: SentencePiece releases the GIL while
            encoding, so threads encode in parallel too and skip the pickling between processes
            (less CPU per token; see ``docs/data_prep.md``). Never changes the output.
        overwrite: replace a different dataset found in ``out_dir``.
        argv: the command line, recorded in the manifest without execution-only options.
        num_tasks, task_index: one task of an array job (``data_prep.array``): process the
            task's share of the input files into ``out_dir/parts/TASK_INDEX/``; ``llp-prep merge``
            then makes the dataset. A task whose part is already complete returns at once.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``; for a task, the part
        manifest), plus ``skip_summary`` lines that are not part of the file.

    Raises:
        DataPrepError: bad settings or input (names file/line), or ``out_dir`` holds a different
            dataset and ``overwrite`` is false.
    """
    opts = read_options or ReadOptions()
    opts.validate()
    _check_settings(seq_len, val_fraction, samples_per_shard, workers, parallel, num_tasks,
                    task_index)
    sp, tok_sha, piece_count = load_tokenizer(tokenizer)   # checked before resolving its path
    model_path = model_file(tokenizer).resolve()
    byte_ids = [i for i in range(piece_count) if sp.is_byte(i)]
    skips = SkipCounter()
    sources = discover(inputs, opts.input_format, skips)
    out = Path(out_dir)
    for given in inputs:
        gp = Path(given).resolve()
        if gp.is_dir() and (out.resolve() == gp or gp in out.resolve().parents):
            raise DataPrepError(f"--out {out} is inside the input directory {given}: its shards "
                                f"would be read as input next time; choose another --out")
    settings = _recorded_settings(inputs, tok_sha, seq_len, val_fraction, split_seed,
                                  samples_per_shard, opts)
    if num_tasks is not None:
        settings["num_tasks"] = num_tasks
    job = ShardJob(
        sources=sources, opts=opts, model_path=model_path, dtype=token_dtype(piece_count),
        seq_len=seq_len, val_fraction=val_fraction, split_seed=split_seed,
        samples_per_shard=samples_per_shard, workers=workers, parallel=parallel, quiet=quiet,
        settings=settings, argv=argv, skips=skips,
        tokenizer={"path": str(model_path), "sha256": tok_sha, "piece_count": piece_count,
                   **special_ids(sp),
                   "byte_fallback_ids": [min(byte_ids), max(byte_ids)] if byte_ids else None,
                   "copy": TOKENIZER_COPY})
    job.fingerprint = fingerprint({"settings": settings, "format_version": FORMAT_VERSION,
                                   "sources": [[s.path, s.identity, s.size] for s in sources]})
    if num_tasks is not None:
        from .array import run_task

        return run_task(job, out, num_tasks, task_index, overwrite)
    ensure_dir(out)
    found = _prepare_out_dir(out, job.fingerprint, overwrite, settings)
    if not quiet:
        print(f"llp-prep shard: {out}: found {found}; {len(sources)} input files, "
              f"{workers} worker(s)", flush=True)
    packers, sinks, source_docs = encode_sources(job, sources, out)
    return _finish_dataset(job, out, inputs, packers, sinks, source_docs)


def _recorded_settings(inputs, tok_sha, seq_len, val_fraction, split_seed, samples_per_shard,
                       opts: ReadOptions) -> Dict:
    """What the manifest records as the run's settings (they make up its fingerprint)."""
    return {
        "inputs": [str(p) for p in inputs],
        "tokenizer_sha256": tok_sha,
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "samples_per_shard": samples_per_shard,
        "doc_sep": opts.doc_sep,
        "text_key": opts.text_key,
        "errors": opts.errors,
        "strict": opts.strict,
        "max_line_bytes": opts.max_line_bytes,
        "input_format": opts.input_format,
        "merge_short": opts.merge_short,
        "piece_chars": PIECE_CHARS,
    }


def _finish_dataset(job: "ShardJob", out: Path, inputs, packers, sinks, source_docs) -> Dict:
    """After encoding: refuse a dataset without a single train sample, else write the tokenizer
    copy and the manifest (last) and clear the run marker. Returns the manifest plus
    ``skip_summary``."""
    totals = {s: packers[s].totals() for s in SPLITS}
    for s in SPLITS:
        job.skips.add("dropped_tail_tokens", totals[s]["dropped_tail_tokens"])
    if totals["train"]["samples"] == 0:
        _discard_run(out, sinks)
        raise DataPrepError(no_train_samples_message(inputs, totals, job.seq_len, job.skips))
    manifest = dataset_manifest(job, list(job.sources), source_docs,
                                sinks["train"].shards + sinks["val"].shards, totals)
    warn_empty_val(job, totals)
    copy_tokenizer(job.model_path, out)
    write_json_atomic(out / MANIFEST, manifest)
    (out / RUN_MARKER).unlink(missing_ok=True)
    manifest = dict(manifest)
    manifest["skip_summary"] = job.skips.summary_lines()
    return manifest


def no_train_samples_message(inputs, totals: Dict, seq_len: int, skips: SkipCounter) -> str:
    """The one line for a run whose train split holds no sample (an empty or too short input)."""
    t = totals["train"]
    skipped = {k: v for k, v in skips.as_dict().items() if v and k != "dropped_tail_tokens"}
    why = (f"{t['documents']} train documents, {t['text_tokens']} tokens: fewer than one sample "
           f"of seq_len + 1 = {seq_len + 1} tokens")
    if skipped:
        why += f"; skipped: {', '.join(f'{k} {v}' for k, v in skipped.items())}"
    return (f"no train samples from {', '.join(map(str, inputs))} ({why}); give more text, or a "
            f"smaller --seq-len for a tiny corpus (no dataset was written)")


def _discard_run(out: Path, sinks) -> None:
    """Remove the shards and the run marker this run wrote (a refused run leaves no dataset)."""
    for sink in sinks.values():
        for entry in sink.shards:
            (out / entry["name"]).unlink(missing_ok=True)
    (out / RUN_MARKER).unlink(missing_ok=True)


@dataclass
class ShardJob:
    """Everything one ``llp-prep shard`` run (or one task of an array) needs."""

    sources: List
    opts: ReadOptions
    model_path: Path
    dtype: np.dtype
    seq_len: int
    val_fraction: float
    split_seed: int
    samples_per_shard: int
    workers: int
    parallel: str
    quiet: bool
    settings: Dict
    argv: Optional[List[str]]
    skips: SkipCounter
    tokenizer: Dict
    fingerprint: str = ""


def warn_empty_val(job: ShardJob, totals: Dict) -> None:
    if job.val_fraction > 0 and totals["val"]["samples"] == 0:
        warn(f"the val split is empty ({totals['val']['documents']} documents, "
             f"{totals['val']['text_tokens']} tokens < seq_len + 1 = {job.seq_len + 1}): raise "
             f"--val-fraction or lower --seq-len if you need validation")


def dataset_manifest(job: ShardJob, sources, source_docs: List[int], shards: List[Dict],
                     totals: Dict, extra: Optional[Dict] = None) -> Dict:
    """The ``manifest.json`` dict of a dataset (or of one part of an array job)."""
    L, dtype = job.seq_len, job.dtype
    m = {
        "format_version": FORMAT_VERSION,
        "created_by": "llp-prep (data_prep)",
        "fingerprint": job.fingerprint,
        "seq_len": L,
        "sample_tokens": L + 1,
        "dtype": dtype.name,
        "tokenizer": dict(job.tokenizer),
        "split": {"method": SPLIT_METHOD, "val_fraction": job.val_fraction,
                  "seed": job.split_seed, "unit": "document"},
        "sample_format": {"key": "SPLIT_NNNNNNNNNN, or SPLIT_sSSSSS_NNNNNNNNNN in stream SSSSS "
                                 "(no dots)",
                          "tokens.npy": f"1-D {dtype.name}[seq_len + 1]",
                          "json": "{split, index, [stream], docs: [[doc_id, token_offset, "
                                  "token_count]], tokens_blake2b}"},
        "command": {"argv": strip_execution_only(job.argv), "settings": job.settings,
                    "not_recorded": list(NOT_RECORDED)},
        "sources": [{"path": s.path, "identity": s.identity, "format": s.fmt, "bytes": s.size,
                     "documents": n} for s, n in zip(sources, source_docs)],
        "shards": shards,
        "totals": totals,
        "skipped": job.skips.as_dict(),
        "skipped_reasons": dict(SKIP_KINDS),
    }
    m.update(extra or {})
    return m


def encode_sources(job: ShardJob, sources, out: Path, stream: Optional[int] = None,
                   val_packer=None):
    """Read, encode and pack ``sources`` into shards in ``out``.

    ``stream``: the train samples' stream number (array tasks; part of their keys);
    ``val_packer``: a stand-in for the val packer (array tasks record the val stream instead of
    packing it). Returns ``(packers, sinks, documents per source)``.
    """
    sinks = {s: _ShardSink(out, s, job.samples_per_shard, job.seq_len) for s in SPLITS}
    packers = {"train": _SplitPacker("train", job.seq_len, job.dtype, sinks["train"], stream),
               "val": val_packer or _SplitPacker("val", job.seq_len, job.dtype, sinks["val"])}
    source_docs = [0] * len(sources)
    progress = Progress(total_bytes=sum(s.size for s in sources), desc="shard", quiet=job.quiet)
    pool = None
    workers = job.workers
    try:
        if workers > 0 and job.parallel == "processes":
            ctx = get_context("spawn" if os.name != "posix" else "fork")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(job.model_path),))
        else:
            _init_worker(str(job.model_path))
            if workers > 0:  # SentencePiece releases the GIL while encoding a batch
                pool = ThreadPool(workers)
        _run_pipeline(sources, job.opts, job.skips, progress, pool, workers, packers, source_docs,
                      job.val_fraction, job.split_seed)
        for s in SPLITS:
            packers[s].emit()
            sinks[s].close_current()
    except BaseException:
        for s in SPLITS:
            sinks[s].abort()
        if val_packer is not None:
            val_packer.abort()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return packers, sinks, source_docs


def _batches(doc_iter, sources, source_docs, val_fraction, split_seed, read_bytes):
    """Group document pieces into batches; assign document ids and splits (in input order).

    Yields ``(texts, meta, input_bytes)``; ``read_bytes[0]`` accumulates the on-disk bytes read
    (taken and reset per batch, so the progress bar advances when a batch is done, not read)."""
    texts: List[str] = []
    meta: List[tuple] = []
    chars = 0
    doc_id = -1
    split = "train"
    new_doc = True
    for si, ordinal, piece, last in doc_iter:
        if new_doc:
            doc_id += 1
            split = split_of(sources[si].identity, ordinal, val_fraction, split_seed)
            source_docs[si] += 1
        texts.append(piece)
        meta.append((doc_id, split, last, new_doc))
        new_doc = last
        chars += len(piece)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_MAX_PIECES:
            nbytes, read_bytes[0] = read_bytes[0], 0
            yield texts, meta, nbytes
            texts, meta, chars = [], [], 0
    nbytes, read_bytes[0] = read_bytes[0], 0
    yield texts, meta, nbytes


def _run_pipeline(sources, opts, skips, progress, pool, workers, packers, source_docs,
                  val_fraction, split_seed) -> None:
    doc_offset = {s: 0 for s in SPLITS}

    def consume(meta, input_bytes, result):
        arr, ntok, nbytes, nunk, nbyte, n_space_symbol = result
        skips.add("space_symbol_characters", n_space_symbol)
        ends = np.cumsum(ntok)
        pos = 0
        for i, (doc_id, split, last, first) in enumerate(meta):
            p = packers[split]
            if first:
                p.documents += 1
                doc_offset[split] = 0
            end = int(ends[i])
            p.add(doc_id, doc_offset[split], arr[pos:end])
            doc_offset[split] += end - pos
            pos = end
            p.text_bytes += int(nbytes[i])
            p.unk += int(nunk[i])
            p.byte_fallback += int(nbyte[i])
        n_tok = int(ends[-1]) if len(ends) else 0
        progress.add_docs(sum(1 for m in meta if m[2]))
        progress.add_tokens(n_tok)
        progress.add_bytes(input_bytes)
        for p in packers.values():
            p.emit()

    read_bytes = [0]

    def on_read(n: int) -> None:
        read_bytes[0] += n

    batches = _batches(iter_documents(sources, opts, skips, on_read), sources,
                       source_docs, val_fraction, split_seed, read_bytes)
    if pool is None:
        for texts, meta, nb in batches:
            consume(meta, nb, _encode_batch(texts, [m[2] for m in meta]))
        return
    window: Deque = deque()
    for texts, meta, nb in batches:
        window.append((meta, nb, pool.apply_async(_encode_batch, (texts, [m[2] for m in meta]))))
        while len(window) > 2 * workers + 1:
            m, b, r = window.popleft()
            consume(m, b, r.get())
    while window:
        m, b, r = window.popleft()
        consume(m, b, r.get())
