"""Sharding on many nodes as a job array (``llp-prep shard --num-tasks N --task-index I``) and
``llp-prep merge OUT``; ``launch/slurm/prep.sbatch`` runs both on SLURM (see
``docs/data_prep.md``).

Plan. The input files (discovered in the same sorted order by every task) are cut into N
contiguous runs balanced by size: file ``j`` goes to task ``floor(N * (bytes before j + size_j / 2)
/ total bytes)``. Contiguous runs keep the input order, so task ``I``'s documents are exactly
documents ``D_I .. D_{I+1} - 1`` of a single-process run, with the same ids once offset by
``D_I``, and the same train/val assignment (the split hashes each document's own identity). The
plan is written to ``OUT/parts/plan.json`` by every task (same bytes each time).

Task ``I`` writes ``OUT/parts/I/``:

- ``train-NNNNNN.tar``: its train documents packed as stream ``I`` (keys
  ``train_sIIIII_NNNNNNNNNN``);
- ``train-tail.tokens`` / ``.segments``: the train tokens after its last complete sample;
- ``val.tokens`` / ``.segments``: its whole val token stream, not packed (raw little-endian
  ``dtype`` ids; ``int64`` triples ``[doc_id, doc_offset, count]``);
- ``manifest.json`` (``"kind": "part"``) last. A part with a manifest of this job is complete:
  rerunning the array skips it, and redoes only the parts without one.

Merge (refused while any part is missing or incomplete, naming them): the parts' train shards are
hard-linked (copied where links are impossible, never re-encoded) into ``OUT`` as
``train-NNNNNN.tar`` in task order; the train tails of all parts, in task order, are packed into
one more stream (number N); the val streams of all parts, in task order, are packed into ordinary
``val-NNNNNN.tar`` shards, which are byte-identical to a single-process run's. ``manifest.json`` is
written last, then ``parts/`` is removed. Everything is in task order, so the result does not
depend on which task finished first, and a killed merge is simply run again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np

from .errors import SKIP_KINDS, DataPrepError, SkipCounter
from .inputs import warn
from .manifest import (MANIFEST, PARTIAL_SUFFIX, RUN_MARKER, SHARD_RE, SPLITS, ensure_dir,
                       fingerprint, read_manifest, shard_name, write_json_atomic)

PARTS = "parts"
PLAN = "plan.json"
STREAM_FILES = {"train_tail": "train-tail", "val": "val"}
SUM_KEYS = ("documents", "text_bytes", "text_tokens", "unk_tokens", "byte_fallback_tokens")


# ----------------------------------------------------------------------------- plan
def plan_tasks(sizes: List[int], num_tasks: int) -> List[List[int]]:
    """Source indices of each task: contiguous runs of the input order, balanced by size."""
    total = sum(sizes) or 1
    tasks: List[List[int]] = [[] for _ in range(num_tasks)]
    before = 0
    for j, size in enumerate(sizes):
        t = min(num_tasks - 1, int(num_tasks * (before + size / 2) / total))
        tasks[t].append(j)
        before += size
    return tasks


def part_dir(out: Path, index: int) -> Path:
    return out / PARTS / str(index)


# ----------------------------------------------------------------------------- stream files
class StreamFile:
    """A token stream written to ``NAME.tokens`` (raw ids) and ``NAME.segments`` (int64
    ``[doc_id, doc_offset, count]``), each through ``.partial`` and a rename.

    It stands in for a split packer in an array task (``add``, ``emit``, ``totals`` and the
    per-split counters), so the val split is recorded, not packed."""

    def __init__(self, out: Path, name: str, dtype: np.dtype) -> None:
        self.out, self.name, self.dtype = out, name, dtype
        self.paths = {ext: out / f"{name}.{ext}" for ext in ("tokens", "segments")}
        self.files = {ext: open(str(p) + PARTIAL_SUFFIX, "wb") for ext, p in self.paths.items()}
        self.hashes = {ext: hashlib.sha256() for ext in self.paths}
        self.stream_len = self.n_segments = 0
        self.documents = self.text_bytes = self.unk = self.byte_fallback = 0
        self._last = None     # [doc_id, end] of the last segment, to join continued documents
        self._segs: List[List[int]] = []

    def _write(self, ext: str, b: bytes) -> None:
        try:
            self.files[ext].write(b)
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.paths[ext]) + PARTIAL_SUFFIX
            raise
        self.hashes[ext].update(b)

    def add(self, doc_id: int, doc_offset: int, tokens: np.ndarray) -> None:
        n = len(tokens)
        if n == 0:
            return
        self._write("tokens", np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        if self._segs and self._segs[-1][0] == doc_id and \
                self._segs[-1][1] + self._segs[-1][2] == doc_offset:
            self._segs[-1][2] += n
        else:
            self._flush_segments(keep_last=True)
            self._segs.append([doc_id, doc_offset, n])
        self.stream_len += n

    def _flush_segments(self, keep_last: bool) -> None:
        done = self._segs[:-1] if keep_last else self._segs
        if done:
            self._write("segments", np.asarray(done, dtype="<i8").tobytes())
            self.n_segments += len(done)
        self._segs = self._segs[-1:] if keep_last else []

    def emit(self) -> None:
        """Nothing to pack (a packer's ``emit``)."""

    def close(self) -> Dict:
        """Finish both files (fsync, rename); returns their manifest entry."""
        self._flush_segments(keep_last=False)
        for ext, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(str(self.paths[ext]) + PARTIAL_SUFFIX, self.paths[ext])
        return {"tokens_file": self.paths["tokens"].name,
                "segments_file": self.paths["segments"].name,
                "tokens": self.stream_len, "segments": self.n_segments,
                "tokens_sha256": self.hashes["tokens"].hexdigest(),
                "segments_sha256": self.hashes["segments"].hexdigest()}

    def abort(self) -> None:
        for ext, f in self.files.items():
            f.close()
            Path(str(self.paths[ext]) + PARTIAL_SUFFIX).unlink(missing_ok=True)

    def totals(self) -> Dict:
        return {"documents": self.documents, "samples": 0, "tokens": 0, "stream_tokens": 0,
                "text_bytes": self.text_bytes, "text_tokens": self.stream_len,
                "dropped_tail_tokens": 0, "unk_tokens": self.unk,
                "byte_fallback_tokens": self.byte_fallback, "shards": 0}


def read_stream(d: Path, entry: Dict, dtype: np.dtype):
    """``(tokens, segments)`` of a part's stream files, after checking their sha256 and sizes.

    Raises:
        DataPrepError: a file is missing, truncated or modified (names it).
    """
    out = []
    for ext, want_dtype, n in (("tokens", dtype, entry["tokens"]),
                               ("segments", np.dtype("<i8"), entry["segments"] * 3)):
        p = d / entry[f"{ext}_file"]
        try:
            data = p.read_bytes()
        except OSError as e:
            raise DataPrepError(f"{p}: cannot be read ({e.strerror}); rerun this task") from e
        if hashlib.sha256(data).hexdigest() != entry[f"{ext}_sha256"] or \
                len(data) != n * np.dtype(want_dtype).itemsize:
            raise DataPrepError(f"{p}: differs from its part manifest (modified or truncated); "
                                f"rerun this task (remove {d} first)")
        out.append(np.frombuffer(data, dtype=want_dtype))
    return out[0], out[1].reshape(-1, 3)


# ----------------------------------------------------------------------------- a task
def run_task(job, out: Path, num_tasks: int, index: int, overwrite: bool) -> Dict:
    """Task ``index`` of ``num_tasks``: process its share of ``job.sources`` into
    ``out/parts/index/`` (see the module docstring). Returns the part manifest."""
    from .shards import _prepare_out_dir, copy_tokenizer, dataset_manifest, encode_sources

    ensure_dir(out)
    final = out / MANIFEST
    if final.is_file():
        m = read_manifest(out)
        if m.get("fingerprint") == job.fingerprint:
            print(f"llp-prep shard: task {index}: {out} is already merged; nothing to do",
                  flush=True)
            return _with_summary(m, job.skips)
        if not overwrite:
            raise DataPrepError(f"{out} holds a different finished dataset; pass --overwrite to "
                                f"replace it, or choose another --out")
    tasks = plan_tasks([s.size for s in job.sources], num_tasks)
    plan = {"format_version": 1, "job_fingerprint": job.fingerprint, "num_tasks": num_tasks,
            "method": "contiguous runs of the input files, balanced by bytes",
            "tasks": [{"index": i, "sources": [job.sources[j].identity for j in t],
                       "bytes": sum(job.sources[j].size for j in t)} for i, t in enumerate(tasks)]}
    ensure_dir(out / PARTS)
    _check_plan(out, plan, overwrite)
    write_json_atomic(out / PARTS / PLAN, plan)
    pdir = ensure_dir(part_dir(out, index))
    pm_path = pdir / MANIFEST
    if pm_path.is_file():
        try:
            pm = read_manifest(pdir)
        except DataPrepError:
            pm = {}
        if pm.get("kind") == "part" and pm.get("job_fingerprint") == job.fingerprint:
            print(f"llp-prep shard: task {index}: {pdir} is already complete; nothing to do",
                  flush=True)
            return _with_summary(pm, job.skips)
    part_fp = fingerprint({"job": job.fingerprint, "task_index": index})
    _prepare_out_dir(pdir, part_fp, overwrite=True, settings=job.settings)
    for stale in pdir.iterdir():
        if stale.name.endswith((".tokens", ".segments", ".tokens" + PARTIAL_SUFFIX,
                                ".segments" + PARTIAL_SUFFIX)):
            stale.unlink()
    mine = [job.sources[j] for j in tasks[index]]
    if not job.quiet:
        print(f"llp-prep shard: task {index} of {num_tasks}: {len(mine)} of {len(job.sources)} "
              f"input files ({plan['tasks'][index]['bytes']:,} bytes) -> {pdir}", flush=True)
    val = StreamFile(pdir, STREAM_FILES["val"], job.dtype)
    packers, sinks, source_docs = encode_sources(job, mine, pdir, stream=index, val_packer=val)
    tail_tokens, tail_segs = packers["train"].tail()
    tail = StreamFile(pdir, STREAM_FILES["train_tail"], job.dtype)
    try:
        pos = 0
        for doc_id, off, n in tail_segs:
            tail.add(doc_id, off, tail_tokens[pos:pos + n])
            pos += n
        streams = {"val": val.close(), "train_tail": tail.close()}
    except BaseException:
        val.abort()
        tail.abort()
        raise
    totals = {s: packers[s].totals() for s in SPLITS}
    totals["train"]["dropped_tail_tokens"] = 0      # kept in train-tail for the merge
    m = dataset_manifest(job, mine, source_docs, sinks["train"].shards, totals, extra={
        "kind": "part", "fingerprint": part_fp, "job_fingerprint": job.fingerprint,
        "task_index": index, "num_tasks": num_tasks, "streams": streams})
    copy_tokenizer(job.model_path, pdir)
    write_json_atomic(pm_path, m)
    (pdir / RUN_MARKER).unlink(missing_ok=True)
    return _with_summary(m, job.skips)


def _with_summary(m: Dict, skips: SkipCounter) -> Dict:
    m = dict(m)
    sk = SkipCounter()
    for k, v in (m.get("skipped") or skips.as_dict()).items():
        if k in SKIP_KINDS:
            sk.add(k, int(v))
    m["skip_summary"] = sk.summary_lines()
    return m


def _check_plan(out: Path, plan: Dict, overwrite: bool) -> None:
    p = out / PARTS / PLAN
    if not p.is_file():
        return
    try:
        old = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if old.get("job_fingerprint") != plan["job_fingerprint"] and not overwrite:
        raise DataPrepError(
            f"{p} belongs to a different job ({old.get('num_tasks')} tasks, fingerprint "
            f"{str(old.get('job_fingerprint'))[:12]} vs {plan['job_fingerprint'][:12]}: other "
            f"inputs, settings or --num-tasks); pass --overwrite to every task to replace its "
            f"parts, or choose another --out")


# ----------------------------------------------------------------------------- merge
def merge_parts(out_dir: os.PathLike, keep_parts: bool = False, overwrite: bool = False,
                quiet: bool = True) -> Dict:
    """Merge the complete parts of ``OUT/parts/`` into one dataset (module docstring).

    Raises:
        DataPrepError: no plan, a part missing / incomplete / of another job (all named, with
            the rerun to do), a damaged stream file, or ``OUT`` holding a different dataset.
    """
    from .shards import copy_tokenizer

    out = Path(out_dir)
    plan_path = out / PARTS / PLAN
    if not plan_path.is_file():
        if (out / MANIFEST).is_file() and read_manifest(out).get("array"):
            print(f"llp-prep merge: {out} is already merged; nothing to do")
            return read_manifest(out)
        raise DataPrepError(f"{plan_path} not found: run the array first (`llp-prep shard ... "
                            f"--out {out} --num-tasks N --task-index I` for every I)")
    plan = _read_plan(plan_path)
    n = plan["num_tasks"]
    parts = _complete_parts(out, plan)
    _check_replaceable(out, plan["job_fingerprint"], overwrite)
    write_json_atomic(out / RUN_MARKER, {"fingerprint": plan["job_fingerprint"], "merging": True})
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if SHARD_RE.match(p.name) or p.name.endswith(".tar" + PARTIAL_SUFFIX):
            p.unlink()
    first = parts[0]
    L = int(first["seq_len"])
    shards, doc_offsets, tail, val = _merge_shards(out, parts, n)
    totals = _merged_totals(parts, tail, val, L)
    if totals["train"]["samples"] == 0:
        for sh in shards:
            (out / sh["name"]).unlink(missing_ok=True)
        (out / RUN_MARKER).unlink(missing_ok=True)
        raise DataPrepError(f"{out}: the {n} parts hold no train sample together "
                            f"({totals['train']['documents']} train documents, "
                            f"{totals['train']['text_tokens']} tokens: fewer than seq_len + 1 = "
                            f"{L + 1}); give more text or a smaller --seq-len, and rerun the "
                            f"array (no dataset was written)")
    m = _merged_manifest(parts, plan, shards, totals, doc_offsets, n)
    copy_tokenizer(part_dir(out, 0) / first["tokenizer"]["copy"], out)
    write_json_atomic(out / MANIFEST, m)
    (out / RUN_MARKER).unlink(missing_ok=True)
    if not keep_parts:
        shutil.rmtree(out / PARTS)
    if m["totals"]["val"]["samples"] == 0 and first["split"]["val_fraction"] > 0:
        warn(f"the val split is empty ({m['totals']['val']['text_tokens']} tokens < seq_len + 1 "
             f"= {L + 1}): raise --val-fraction or lower --seq-len if you need validation")
    return m


def _complete_parts(out: Path, plan: Dict) -> List[Dict]:
    """The manifests of all parts of ``plan``; raises ``DataPrepError`` naming every part that is
    missing, incomplete, of another job or damaged, with the rerun to do."""
    n = plan["num_tasks"]
    parts, problems = [], []
    for i in range(n):
        pdir = part_dir(out, i)
        try:
            pm = read_manifest(pdir) if (pdir / MANIFEST).is_file() else None
        except DataPrepError as e:
            pm, why = None, str(e)
        else:
            why = ("missing" if not pdir.is_dir() else
                   "incomplete (running, killed or failed: no manifest.json)" if pm is None else
                   "of another job" if pm.get("job_fingerprint") != plan["job_fingerprint"]
                   else "")
        if not why and not _part_ok(pm):
            why = "damaged (its manifest lacks the stream files' entries)"
        if why:
            problems.append((i, why))
        parts.append(pm)
    if problems:
        listed = "; ".join(f"part {i}: {why}" for i, why in problems)
        ids = ",".join(str(i) for i, _ in problems)
        raise DataPrepError(f"{out}: {len(problems)} of {n} parts are not complete ({listed}); "
                            f"rerun those tasks (e.g. `sbatch --array={ids} "
                            f"launch/slurm/prep.sbatch ...`, or `llp-prep shard ... --num-tasks "
                            f"{n} --task-index I`), then merge again")
    return parts


def _check_replaceable(out: Path, job_fp: str, overwrite: bool) -> None:
    """Refuse to replace a different finished dataset in ``out`` unless ``overwrite``."""
    old = out / MANIFEST
    if old.is_file():
        try:
            old_fp = json.loads(old.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old_fp = None
        if old_fp != job_fp and not overwrite:
            raise DataPrepError(f"{out} holds a different finished dataset; pass --overwrite to "
                                f"replace it with the merged parts, or choose another --out")


def _merge_shards(out: Path, parts: List[Dict], n: int):
    """Link every part's full train shards into ``out`` and re-pack the parts' train tails and
    val streams into new shards. Returns ``(shards, doc_offsets, tail_packer, val_packer)``."""
    from .shards import _ShardSink, _SplitPacker

    first = parts[0]
    L, dtype = int(first["seq_len"]), np.dtype(first["dtype"])
    shards: List[Dict] = []
    for i, pm in enumerate(parts):
        for sh in pm["shards"]:
            name = shard_name("train", len(shards))
            _link(part_dir(out, i) / sh["name"], out / name, sh)
            shards.append(dict(sh, name=name))
    doc_offsets = np.cumsum([0] + [pm["totals"]["train"]["documents"] +
                                   pm["totals"]["val"]["documents"] for pm in parts]).tolist()
    per_shard = int(first["command"]["settings"]["samples_per_shard"])
    tail_sink = _ShardSink(out, "train", per_shard, L)
    tail_sink.first_index = len(shards)
    tail = _SplitPacker("train", L, dtype, tail_sink, stream=n)
    val_sink = _ShardSink(out, "val", per_shard, L)
    val = _SplitPacker("val", L, dtype, val_sink)
    try:
        for i, pm in enumerate(parts):
            for packer, key in ((tail, "train_tail"), (val, "val")):
                tokens, segs = read_stream(part_dir(out, i), pm["streams"][key], dtype)
                pos = 0
                for doc_id, off, cnt in segs.tolist():
                    packer.add(doc_id + doc_offsets[i], off, tokens[pos:pos + cnt])
                    pos += cnt
                packer.emit()
        tail_sink.close_current()
        val_sink.close_current()
    except BaseException:
        tail_sink.abort()
        val_sink.abort()
        raise
    return shards + tail_sink.shards + val_sink.shards, doc_offsets, tail, val


def _read_plan(path: Path) -> Dict:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(plan, dict) and isinstance(plan.get("num_tasks"), int)
              and plan["num_tasks"] >= 1 and isinstance(plan.get("job_fingerprint"), str)
              and isinstance(plan.get("tasks"), list))
    except (OSError, ValueError) as e:
        raise DataPrepError(f"{path}: cannot be read ({e}); rerun any task of the array to "
                            f"rewrite it") from e
    if not ok:
        raise DataPrepError(f"{path}: not a plan written by llp-prep (num_tasks, "
                            f"job_fingerprint, tasks); rerun any task of the array to rewrite it")
    return plan


def _part_ok(pm: Dict) -> bool:
    """The keys of a part manifest that the merge reads (beyond ``check_manifest_types``)."""
    want = ("tokens_file", "segments_file", "tokens", "segments", "tokens_sha256",
            "segments_sha256")
    st = pm.get("streams")
    return (isinstance(st, dict) and all(isinstance(st.get(k), dict) and all(w in st[k] for w in want)
                                         for k in STREAM_FILES)
            and isinstance(pm.get("sources"), list) and isinstance(pm.get("command"), dict)
            and isinstance(pm["command"].get("settings"), dict)
            and isinstance(pm["tokenizer"].get("copy"), str)
            and all(k in pm["totals"][s] for s in SPLITS for k in SUM_KEYS + ("samples",)))


def _link(src: Path, dst: Path, entry: Dict) -> None:
    """Hard-link a part's shard into the dataset (a copy where links are impossible)."""
    try:
        size = src.stat().st_size
    except OSError as e:
        raise DataPrepError(f"{src}: missing ({e.strerror}); rerun its task") from e
    if size != entry["bytes"]:
        raise DataPrepError(f"{src}: {size} bytes, its part manifest says {entry['bytes']} "
                            f"(truncated or replaced); rerun its task (remove {src.parent} first)")
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _merged_totals(parts: List[Dict], tail, val, L: int) -> Dict:
    tt, vt = tail.totals(), val.totals()
    train = {"documents": 0, "samples": tt["samples"], "tokens": tt["tokens"],
             "stream_tokens": tt["stream_tokens"], "text_bytes": 0, "text_tokens": 0,
             "dropped_tail_tokens": tt["dropped_tail_tokens"], "unk_tokens": 0,
             "byte_fallback_tokens": 0, "shards": tt["shards"]}
    valt = dict(vt, documents=0, text_bytes=0, text_tokens=0, unk_tokens=0,
                byte_fallback_tokens=0)
    for pm in parts:
        pt, pv = pm["totals"]["train"], pm["totals"]["val"]
        for k in ("samples", "tokens", "stream_tokens", "shards"):
            train[k] += pt[k]
        for k in SUM_KEYS:
            train[k] += pt[k]
            valt[k] += pv[k]
    return {"train": train, "val": valt}


def _merged_manifest(parts: List[Dict], plan: Dict, shards: List[Dict], totals: Dict,
                     doc_offsets: List[int], n: int) -> Dict:
    first = parts[0]
    skipped = {k: sum(int(pm["skipped"].get(k, 0)) for pm in parts) for k in SKIP_KINDS}
    skipped["dropped_tail_tokens"] = totals["train"]["dropped_tail_tokens"] + \
        totals["val"]["dropped_tail_tokens"]
    m = {k: first[k] for k in ("format_version", "created_by") if k in first}
    m.update({
        "fingerprint": plan["job_fingerprint"],
        **{k: first[k] for k in ("seq_len", "sample_tokens", "dtype", "tokenizer", "split",
                                 "sample_format")},
        "command": dict(first["command"], argv=first["command"]["argv"]),
        "sources": [s for pm in parts for s in pm["sources"]],
        "shards": shards,
        "totals": totals,
        "skipped": skipped,
        "skipped_reasons": dict(SKIP_KINDS),
        "array": {
            "num_tasks": n, "plan": plan["tasks"], "method": plan["method"],
            "streams": [{"stream": i, "split": "train", "task": i, "doc_id_offset": doc_offsets[i],
                         "samples": pm["totals"]["train"]["samples"]}
                        for i, pm in enumerate(parts)]
            + [{"stream": n, "split": "train", "task": None, "doc_id_offset": 0,
                "samples": totals["train"]["samples"] - sum(pm["totals"]["train"]["samples"]
                                                            for pm in parts),
                "what": "the train tails of all tasks, in task order"}],
            "doc_ids": "train samples of stream i < num_tasks carry doc ids relative to their "
                       "task: add streams[i].doc_id_offset; the tail stream and val carry "
                       "global ids (those of a single-process run)",
        },
    })
    return m
