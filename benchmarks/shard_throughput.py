"""Benchmark: ``llp-prep shard`` tokens/s vs raw ``SentencePieceProcessor.encode`` tokens/s, per
input format, and a 3-task array job vs a single process, all in one run.

Everything runs side by side on the same cores (interleaved, ``--runs`` times each) on the same
documents: the bundled KJV corpus, ``--copies`` copies of it as separate files, read with
``--doc-sep blank-line`` (``text``), and the same documents written as JSON Lines (``jsonl``, one
record each) and as Parquet (``parquet``, one row each, row groups of 1,000):

- raw: ``sp.encode(all_documents_in_memory, num_threads=W)`` (documents already read and split;
  tokens counted with one EOS per document, as in the shards);
- shard: ``build_shards(..., workers=W)``: reading + decompression / Parquet decoding + encoding in
  ``W`` worker processes (``Wt``: threads) + packing + tar writing + sha256 + manifest (``W = 0``:
  everything in this process, compared with raw ``num_threads=1``);
- array: ``--array-tasks`` tasks of ``llp-prep shard --num-tasks N --task-index I --workers 0`` as
  subprocesses (``--array-concurrency`` at a time; default all, sharing the cores), then
  ``llp-prep merge``, vs one ``llp-prep shard --workers (cores - 1)`` subprocess on the same text
  input.

Prints one JSON object with the medians and the ratios (targets: shard / raw >= 0.8 for every
format; array / single >= 0.8) of wall-clock tokens/s, and of tokens per CPU-second (CPU time of
this process, its threads and its reaped children), the steadier number on a shared, loaded box.
Usage: ``python benchmarks/shard_throughput.py [--copies 2] [--inputs text,jsonl,parquet]
[--workers 0,2t] [--runs 3] [--array-tasks 3] [--cores 2]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import sentencepiece as spm  # noqa: E402
import webdataset  # noqa: E402,F401  (imported up front so its start-up cost is not timed)

from data_prep import BUNDLED_CORPUS, ReadOptions, build_shards, train_tokenizer  # noqa: E402
from data_prep.errors import SkipCounter  # noqa: E402
from data_prep.inputs import discover, iter_documents  # noqa: E402


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def _write_inputs(work: Path, copies: int, docs_per_copy):
    """The text corpus directory, and the same documents as JSONL and as Parquet."""
    dirs = {f: work / f for f in ("text", "jsonl", "parquet")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        dst = dirs["text"] / f"kjv-{i}.txt.gz"
        if not dst.exists():
            shutil.copyfile(BUNDLED_CORPUS, dst)
        j = dirs["jsonl"] / f"kjv-{i}.jsonl"
        if not j.exists():
            j.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                 for d in docs_per_copy), encoding="utf-8")
        q = dirs["parquet"] / f"kjv-{i}.parquet"
        if not q.exists():
            pq.write_table(pa.table({"text": docs_per_copy}), q, row_group_size=1000)
    return dirs


def _prep(args, env):
    return subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run_array(text_dir: Path, model: Path, out: Path, a, n: int, cores: int) -> None:
    """``n`` array tasks, at most ``cores`` at a time, then the merge (every process pays its
    own start-up: Python, numpy and SentencePiece; ``llp-prep`` no longer imports webdataset,
    and with it torch, to write shards)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    common = ["shard", "--input", text_dir, "--tokenizer", model, "--out", out, "--doc-sep",
              "blank-line", "--seq-len", a.seq_len, "--val-fraction", "0.01",
              "--samples-per-shard", a.samples_per_shard, "--quiet", "--num-tasks", n,
              "--workers", "0"]
    pending, running = list(range(n)), []
    while pending or running:
        while pending and len(running) < cores:
            running.append(_prep(common + ["--task-index", pending.pop(0)], env))
        p = running.pop(0)
        if p.wait() != 0:
            raise SystemExit(f"array task failed: {p.stderr.read()[-2000:]}")
    p = _prep(["merge", out], env)
    if p.wait() != 0:
        raise SystemExit(f"merge failed: {p.stderr.read()[-2000:]}")


def _run_single(text_dir: Path, model: Path, out: Path, a, cores: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = _prep(["shard", "--input", text_dir, "--tokenizer", model, "--out", out, "--doc-sep",
               "blank-line", "--seq-len", a.seq_len, "--val-fraction", "0.01",
               "--samples-per-shard", a.samples_per_shard, "--quiet", "--workers",
               max(cores - 1, 0)], env)
    if p.wait() != 0:
        raise SystemExit(f"single run failed: {p.stderr.read()[-2000:]}")


def _tokens(out: Path) -> int:
    m = json.loads((out / "manifest.json").read_text())
    return m["totals"]["train"]["text_tokens"] + m["totals"]["val"]["text_tokens"]


def _timed(fn):
    c0, t0 = _cpu_seconds(), time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0, _cpu_seconds() - c0


def _summary(raw, shard, raw_cpu, shard_cpu, names=("raw", "shard")) -> dict:
    a, b = names
    return {
        f"{a}_tokens_per_s_median": round(statistics.median(raw)),
        f"{b}_tokens_per_s_median": round(statistics.median(shard)),
        "ratio_median": round(statistics.median(shard) / statistics.median(raw), 3),
        "ratio_per_run": [round(s / r, 3) for s, r in zip(shard, raw)],
        "ratio_per_run_median": round(statistics.median(s / r for s, r in zip(shard, raw)), 3),
        f"{a}_tokens_per_cpu_s_median": round(statistics.median(raw_cpu)),
        f"{b}_tokens_per_cpu_s_median": round(statistics.median(shard_cpu)),
        "cpu_ratio_median": round(statistics.median(shard_cpu) / statistics.median(raw_cpu), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=2, help="copies of the KJV corpus (files)")
    ap.add_argument("--inputs", default="text,jsonl,parquet", help="input formats to measure")
    ap.add_argument("--workers", default="0,2t",
                    help="comma-separated worker counts; a 't' suffix uses threads instead of "
                         "processes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--array-tasks", type=int, default=3, help="0: skip the array comparison")
    ap.add_argument("--cores", type=int, default=2,
                    help="cores the array and single runs share (the single run gets "
                         "--workers cores - 1)")
    ap.add_argument("--array-concurrency", type=int, default=0,
                    help="array tasks running at once (0: all of them, sharing the cores; "
                         "--cores: one core each, as a SLURM array with --cpus-per-task=1)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--samples-per-shard", type=int, default=10_000)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()

    work = Path(a.workdir or tempfile.mkdtemp(prefix="llp-shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    blank = ReadOptions(doc_sep="blank-line")
    tok = work / "tok"
    if not (tok / "tokenizer.model").exists():
        train_tokenizer([str(BUNDLED_CORPUS)], tok, vocab_size=a.vocab_size, read_options=blank)
    model = tok / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    one = []
    cur = []
    for _, _, piece, last in iter_documents(discover([str(BUNDLED_CORPUS)]), blank, SkipCounter()):
        cur.append(piece)
        if last:
            one.append("".join(cur))
            cur = []
    dirs = _write_inputs(work, a.copies, one)
    docs = one * a.copies
    formats = a.inputs.split(",")
    opts = {"text": blank, "jsonl": ReadOptions(), "parquet": ReadOptions()}
    workers = a.workers.split(",")
    keys = [(f, w) for f in formats for w in workers]
    runs = {k: {"raw": [], "shard": [], "raw_cpu": [], "shard_cpu": []} for k in keys}
    arr = {"single": [], "array": [], "single_cpu": [], "array_cpu": []}
    tokens = None
    for r in range(a.runs):
        for f, w in keys:
            n_workers = int(w.rstrip("t"))
            ids, dt, dc = _timed(lambda: sp.encode(docs, num_threads=max(n_workers, 1)))
            n_raw = sum(len(x) for x in ids) + len(docs)
            runs[(f, w)]["raw"].append(n_raw / dt)
            runs[(f, w)]["raw_cpu"].append(n_raw / dc)
            m, dt, dc = _timed(lambda: build_shards(
                [str(dirs[f])], model, work / "shards", seq_len=a.seq_len, val_fraction=0.01,
                workers=n_workers, parallel="threads" if w.endswith("t") else "processes",
                samples_per_shard=a.samples_per_shard, read_options=opts[f], overwrite=True,
                quiet=True))
            n = m["totals"]["train"]["text_tokens"] + m["totals"]["val"]["text_tokens"]
            if n != n_raw:
                raise SystemExit(f"{f}: token counts differ: shard {n} vs raw {n_raw}")
            tokens = n
            runs[(f, w)]["shard"].append(n / dt)
            runs[(f, w)]["shard_cpu"].append(n / dc)
        if a.array_tasks:
            _, dt, dc = _timed(lambda: _run_single(dirs["text"], model, work / "single", a,
                                                   a.cores))
            n = _tokens(work / "single")
            arr["single"].append(n / dt)
            arr["single_cpu"].append(n / dc)
            _, dt, dc = _timed(lambda: _run_array(dirs["text"], model, work / "array", a,
                                                  a.array_tasks,
                                                  a.array_concurrency or a.array_tasks))
            if _tokens(work / "array") != n:
                raise SystemExit("array: token counts differ from the single run")
            arr["array"].append(n / dt)
            arr["array_cpu"].append(n / dc)
    result = {
        "benchmark": "shard_throughput",
        "corpus": f"bundled KJV x{a.copies} ({len(docs)} documents; text: --doc-sep blank-line, "
                  f"jsonl / parquet: the same documents, one record / row each)",
        "tokens": tokens,
        "vocab_size": a.vocab_size,
        "seq_len": a.seq_len,
        "runs": a.runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "by_input": {},
    }
    for f, w in keys:
        rr = runs[(f, w)]
        result["by_input"].setdefault(f, {})[w] = {
            "raw_encode_threads": max(int(w.rstrip("t")), 1),
            "parallel": "threads" if w.endswith("t") else "processes",
            **_summary(rr["raw"], rr["shard"], rr["raw_cpu"], rr["shard_cpu"])}
    if a.array_tasks:
        result["array_vs_single"] = {
            "tasks": a.array_tasks, "cores": a.cores,
            "single": f"one llp-prep shard --workers {max(a.cores - 1, 0)} process",
            "array": f"{a.array_tasks} tasks --workers 0, "
                     f"{a.array_concurrency or a.array_tasks} at a time on the cores, + merge",
            **_summary(arr["single"], arr["array"], arr["single_cpu"], arr["array_cpu"],
                       names=("single", "array"))}
    print(json.dumps(result, indent=1))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
