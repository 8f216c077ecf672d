"""``llp-prep stats DIR``: documents, tokens, shards, tokens per document, bytes per token and
unk / byte-fallback rates of a dataset, from its manifest."""
from __future__ import annotations

import os
from typing import Dict, List

from .manifest import SPLITS, read_manifest


def dataset_stats(directory: os.PathLike) -> Dict:
    """Summarise ``DIR/manifest.json`` per split.

    Returns:
        ``{"seq_len", "dtype", "piece_count", "splits": {split: {...}}, "skipped": {...}}`` where
        each split has ``documents``, ``samples``, ``tokens`` (stored ids, boundary tokens counted
        twice), ``text_tokens`` (tokens the documents encode to, EOS included), ``text_bytes``
        (UTF-8 bytes), ``shards``, ``tokens_per_document``, ``bytes_per_token``
        (``text_bytes / text_tokens``, the bits-per-byte factor), ``unk_rate`` and
        ``byte_fallback_rate`` (fractions of ``text_tokens``; ``None`` when not recorded).

    Raises:
        DataPrepError: no readable manifest (see ``read_manifest``).
    """
    m = read_manifest(directory)
    splits = {}
    for s in SPLITS:
        t = dict(m["totals"].get(s, {}))
        tt = t.get("text_tokens") or 0
        docs = t.get("documents") or 0
        t["tokens_per_document"] = (tt / docs) if docs else None
        t["bytes_per_token"] = (t.get("text_bytes", 0) / tt) if tt else None
        t["unk_rate"] = (t["unk_tokens"] / tt) if tt and "unk_tokens" in t else None
        t["byte_fallback_rate"] = ((t["byte_fallback_tokens"] / tt)
                                   if tt and "byte_fallback_tokens" in t else None)
        splits[s] = t
    return {"directory": str(directory), "seq_len": m["seq_len"], "dtype": m["dtype"],
            "piece_count": m["tokenizer"]["piece_count"], "splits": splits,
            "skipped": m.get("skipped", {})}


def format_stats(st: Dict) -> List[str]:
    """Human-readable lines for ``dataset_stats`` output."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"dataset {st['directory']}: seq_len {st['seq_len']}, dtype {st['dtype']}, "
             f"{st['piece_count']} pieces"]
    head = (f"{'split':6s} {'documents':>10s} {'samples':>9s} {'tokens':>12s} {'text_tokens':>12s} "
            f"{'shards':>6s} {'tok/doc':>9s} {'bytes/tok':>9s} {'unk':>8s} {'byte_fb':>8s}")
    lines.append(head)
    for s, t in st["splits"].items():
        lines.append(f"{s:6s} {t.get('documents', 0):>10,d} {t.get('samples', 0):>9,d} "
                     f"{t.get('tokens', 0):>12,d} {t.get('text_tokens', 0):>12,d} "
                     f"{t.get('shards', 0):>6d} {f(t['tokens_per_document'], '9.1f'):>9s} "
                     f"{f(t['bytes_per_token'], '9.3f'):>9s} {f(t['unk_rate'], '8.2e'):>8s} "
                     f"{f(t['byte_fallback_rate'], '8.2e'):>8s}")
    skipped = {k: v for k, v in st["skipped"].items() if v}
    lines.append("skipped: " + (", ".join(f"{k} {v:,}" for k, v in skipped.items()) or "nothing"))
    return lines
