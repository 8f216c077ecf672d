"""Tiny on-disk datasets for tests and smoke runs, written to the shard contract of ``docs/internals.md``.

These are real WebDataset tars (``webdataset.ShardWriter``) and a real ``manifest.json``; the token
stream is synthetic (a noisy repeating pattern a tiny model can learn), so tests do not need the
tokenizer or ``llp-prep``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import webdataset as wds

__all__ = ["synthetic_stream", "write_tiny_dataset"]


def synthetic_stream(n_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """A learnable token stream: runs of an arithmetic pattern with 10% random tokens; ids in
    ``[4, vocab_size)`` (0-3 are the special ids pad/unk/bos/eos)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_tokens, dtype=np.int64)
    span = vocab_size - 4
    start, step = 0, 1
    for i in range(n_tokens):
        if i % 37 == 0:
            start, step = int(rng.integers(span)), int(rng.integers(1, 4))
        out[i] = 4 + (start + step * (i % 37)) % span
    noise = rng.random(n_tokens) < 0.1
    out[noise] = 4 + rng.integers(span, size=int(noise.sum()))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tiny_dataset(out_dir: str | os.PathLike, seq_len: int, train_samples: Sequence[int],
                       val_samples: Sequence[int] = (8,), vocab_size: int = 64, seed: int = 0,
                       bytes_per_token: float = 3.0) -> Dict:
    """Write ``train-NNNNNN.tar`` shards holding ``train_samples[i]`` samples each, ``val-NNNNNN.tar``
    likewise, and ``manifest.json`` (last). Samples of a split share one boundary token.

    Returns the manifest dict. ``bytes_per_token`` sets ``text_bytes`` for bits-per-byte checks."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards_meta: List[Dict] = []
    totals = {}
    for split, counts, sseed in (("train", train_samples, seed), ("val", val_samples, seed + 1)):
        n = sum(counts)
        stream = synthetic_stream(n * seq_len + 1, vocab_size, sseed)
        k = 0
        for shard_idx, count in enumerate(counts):
            name = f"{split}-{shard_idx:06d}.tar"
            path = out / name
            with wds.TarWriter(str(path)) as w:
                for _ in range(count):
                    arr = stream[k * seq_len: k * seq_len + seq_len + 1].astype(np.uint16)
                    buf = io.BytesIO()
                    np.save(buf, arr, allow_pickle=False)
                    w.write({"__key__": f"{split}_{k:08d}", "tokens.npy": buf.getvalue(),
                             "json": json.dumps({"docs": [0], "offset": k * seq_len}).encode()})
                    k += 1
            shards_meta.append({"name": name, "split": split, "samples": count, "tokens": count * seq_len,
                                "sha256": _sha256(path)})
        text_tokens = n * seq_len + 1
        totals[split] = {"documents": 1, "samples": n, "tokens": n * seq_len, "text_bytes": int(text_tokens * bytes_per_token),
                         "text_tokens": text_tokens, "shards": len(counts)}
    manifest = {
        "format_version": 1,
        "seq_len": seq_len,
        "dtype": "uint16",
        "tokenizer": {"sha256": "synthetic", "piece_count": vocab_size, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3},
        "shards": shards_meta,
        "totals": totals,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest
