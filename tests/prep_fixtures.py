"""Helpers for the array-job tests: a few MB of real text split into files, and a comparison of
two datasets by their documents' tokens (read back with plain webdataset, not project code)."""
from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import webdataset as wds

from data_prep import BUNDLED_CORPUS


def write_corpus(d: Path, files: int = 9, chapters: int = 0) -> Path:
    """The KJV (4.3 MB) cut into ``files`` files of unequal size, chapters kept whole."""
    d.mkdir(parents=True, exist_ok=True)
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        paras = f.read().split("\n\n")
    if chapters:
        paras = paras[:chapters]
    weights = np.arange(1, files + 1, dtype=float)
    cuts = np.concatenate([[0], np.cumsum(weights / weights.sum() * len(paras))]).astype(int)
    for i in range(files):
        (d / f"part{i:02d}.txt").write_text("\n\n".join(paras[cuts[i]:cuts[i + 1]]) + "\n",
                                            encoding="utf-8")
    return d


def document_tokens(ds: Path) -> Tuple[Dict[str, Dict[int, List[int]]], Dict]:
    """``{split: {global doc_id: its tokens as stored}}`` rebuilt from the samples' ``docs`` spans
    (consecutive samples overlap by one token, so a position may be written twice, equally)."""
    m = json.loads((ds / "manifest.json").read_text())
    offsets = {s["stream"]: s["doc_id_offset"] for s in m.get("array", {}).get("streams", [])}
    out: Dict[str, Dict[int, Dict[int, int]]] = {"train": {}, "val": {}}
    for sh in m["shards"]:
        for s in wds.WebDataset(str(ds / sh["name"]), shardshuffle=False):
            arr = np.load(io.BytesIO(s["tokens.npy"])).tolist()
            meta = json.loads(s["json"])
            add = offsets.get(meta.get("stream"), 0)
            pos = 0
            for doc_id, off, cnt in meta["docs"]:
                doc = out[sh["split"]].setdefault(doc_id + add, {})
                for k in range(cnt):
                    prev = doc.setdefault(off + k, arr[pos + k])
                    assert prev == arr[pos + k], (sh["name"], doc_id, off + k)
                pos += cnt
    docs = {split: {d: [t[k] for k in sorted(t)] for d, t in by.items()}
            for split, by in out.items()}
    return docs, m


def assert_same_documents(a: Path, b: Path) -> None:
    """Datasets ``a`` and ``b`` hold the same documents with the same tokens, as multisets; only
    documents cut by a split's dropped tail (< seq_len + 1 tokens, at most a few per split) may
    be shorter in one of them, and then as a prefix of the other."""
    da, ma = document_tokens(a)
    db, mb = document_tokens(b)
    L = ma["seq_len"]
    for split in ("train", "val"):
        for k in ("documents", "text_tokens", "text_bytes", "unk_tokens", "byte_fallback_tokens"):
            assert ma["totals"][split][k] == mb["totals"][split][k], (split, k)
        A, B = da[split], db[split]
        differ = [d for d in set(A) | set(B) if A.get(d) != B.get(d)]
        assert len(differ) <= 6, (split, len(differ))
        for d in differ:
            x, y = A.get(d, []), B.get(d, [])
            short, long_ = sorted((x, y), key=len)
            assert long_[:len(short)] == short and len(long_) - len(short) <= L + 1, (split, d)
        full_a = Counter(tuple(A[d]) for d in A if d not in differ)
        full_b = Counter(tuple(B[d]) for d in B if d not in differ)
        assert full_a == full_b and sum(full_a.values()) >= ma["totals"][split]["documents"] - 6
