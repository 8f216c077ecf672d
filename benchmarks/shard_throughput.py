"""Benchmark: ``llp-prep shard`` tokens/s vs raw ``SentencePieceProcessor.encode`` tokens/s.

Both run in this process, side by side (interleaved, ``--runs`` times each), on the same documents
(the bundled KJV corpus, ``--copies`` copies of it as separate files, read with
``--doc-sep blank-line``) and the same cores:

- raw: ``sp.encode(all_documents_in_memory, num_threads=W)`` (documents already read and split;
  tokens counted with one EOS per document, as in the shards);
- shard: ``build_shards(..., workers=W)``: reading + decompression + encoding in ``W`` worker
  processes (``Wt``: threads) + packing + tar writing + sha256 + manifest (``W = 0``: everything
  in this process, compared with raw ``num_threads=1``).

Prints one JSON object with, per ``W``, the medians and the ratio ``shard / raw`` of wall-clock
tokens/s (the target: >= 0.8), and of tokens per CPU-second (CPU time of this process, its
threads and its reaped worker processes), which is the steadier number on a shared, loaded box.
Usage: ``python benchmarks/shard_throughput.py [--copies 4] [--workers 0,1,2] [--runs 5]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="copies of the KJV corpus (files)")
    ap.add_argument("--workers", default="0,1,2,2t",
                    help="comma-separated worker counts; a 't' suffix uses threads instead of "
                         "processes")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--samples-per-shard", type=int, default=10_000)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()

    work = Path(a.workdir or tempfile.mkdtemp(prefix="llp-shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(a.copies):
        dst = corpus / f"kjv-{i}.txt.gz"
        if not dst.exists():
            shutil.copyfile(BUNDLED_CORPUS, dst)
    blank = ReadOptions(doc_sep="blank-line")
    tok = work / "tok"
    if not (tok / "tokenizer.model").exists():
        train_tokenizer([str(BUNDLED_CORPUS)], tok, vocab_size=a.vocab_size, read_options=blank)
    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    docs = []
    cur = []
    for _, _, piece, last in iter_documents(discover([str(corpus)]), blank, SkipCounter()):
        cur.append(piece)
        if last:
            docs.append("".join(cur))
            cur = []

    workers = a.workers.split(",")
    runs = {w: {"raw": [], "shard": [], "raw_cpu": [], "shard_cpu": []} for w in workers}
    tokens = None
    for r in range(a.runs):
        for w in workers:
            n_workers = int(w.rstrip("t"))
            c0, t0 = _cpu_seconds(), time.perf_counter()
            ids = sp.encode(docs, num_threads=max(n_workers, 1))
            dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
            n_raw = sum(len(x) for x in ids) + len(docs)
            runs[w]["raw"].append(n_raw / dt)
            runs[w]["raw_cpu"].append(n_raw / dc)
            c0, t0 = _cpu_seconds(), time.perf_counter()
            m = build_shards([str(corpus)], tok / "tokenizer.model", work / "shards",
                             seq_len=a.seq_len, val_fraction=0.01, workers=n_workers,
                             parallel="threads" if w.endswith("t") else "processes",
                             samples_per_shard=a.samples_per_shard, read_options=blank,
                             overwrite=True, quiet=True)
            dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
            n = m["totals"]["train"]["text_tokens"] + m["totals"]["val"]["text_tokens"]
            if n != n_raw:
                raise SystemExit(f"token counts differ: shard {n} vs raw {n_raw}")
            tokens = n
            runs[w]["shard"].append(n / dt)
            runs[w]["shard_cpu"].append(n / dc)
    result = {
        "benchmark": "shard_throughput",
        "corpus": f"bundled KJV x{a.copies} ({len(docs)} documents, --doc-sep blank-line)",
        "tokens": tokens,
        "vocab_size": a.vocab_size,
        "seq_len": a.seq_len,
        "runs": a.runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "by_workers": {},
    }
    for w in workers:
        raw = statistics.median(runs[w]["raw"])
        shard = statistics.median(runs[w]["shard"])
        result["by_workers"][w] = {
            "raw_encode_threads": max(int(w.rstrip("t")), 1),
            "parallel": "threads" if w.endswith("t") else "processes",
            "raw_tokens_per_s_median": round(raw),
            "shard_tokens_per_s_median": round(shard),
            "ratio_median": round(shard / raw, 3),
            "ratio_per_run": [round(s / r, 3) for s, r in zip(runs[w]["shard"], runs[w]["raw"])],
            "ratio_per_run_median": round(statistics.median(
                s / r for s, r in zip(runs[w]["shard"], runs[w]["raw"])), 3),
            "raw_tokens_per_cpu_s_median": round(statistics.median(runs[w]["raw_cpu"])),
            "shard_tokens_per_cpu_s_median": round(statistics.median(runs[w]["shard_cpu"])),
            "cpu_ratio_median": round(statistics.median(runs[w]["shard_cpu"])
                                      / statistics.median(runs[w]["raw_cpu"]), 3),
        }
    print(json.dumps(result, indent=1))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
