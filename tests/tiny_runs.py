"""Test helpers (not installed): tiny on-disk datasets written to the shard contract of ``docs/internals.md``
and tiny run configs.

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

__all__ = ["synthetic_stream", "write_tiny_dataset", "tiny_run_config"]


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
    from data_prep.tokenizer import file_sha256

    return file_sha256(path)


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
                    # the json llp-prep writes: split index and checksum of the token bytes (data_prep/shards.py)
                    meta = {"split": split, "index": k, "docs": [[0, k * seq_len, seq_len + 1]],
                            "tokens_blake2b": hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()}
                    w.write({"__key__": f"{split}_{k:08d}", "tokens.npy": buf.getvalue(),
                             "json": json.dumps(meta).encode()})
                    k += 1
            shards_meta.append({"name": name, "split": split, "samples": count, "tokens": count * (seq_len + 1),
                                "bytes": path.stat().st_size, "sha256": _sha256(path)})
        text_tokens = n * seq_len + 1
        totals[split] = {"documents": 1, "samples": n, "tokens": n * (seq_len + 1), "text_bytes": int(text_tokens * bytes_per_token),
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


def tiny_run_config(data_dir: str, output_dir: str, **sections) -> Dict:
    """A raw run-config dict for a tiny LLP on a :func:`write_tiny_dataset` directory; ``sections``
    update the ``model``/``data``/``train``/... sections (e.g. ``train={"max_steps": 4}``)."""
    cfg = {
        "model": {"variant": "llp", "vocab_size": "auto", "d_model": 32, "n_heads": 2, "n_layers": 2,
                  "seq_len": 16, "segment_len": 4},
        "data": {"path": str(data_dir), "num_workers": 0, "shuffle_buffer": 8, "val_samples": 4},
        "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "log_interval": 1, "save_interval": 0, "eval_interval": 0, "sample_tokens": 0,
                  "peak_flops": 1e11},
        "parallel": {"sequence_parallel_size": 1},
        "deepspeed": "configs/deepspeed/zero0.json",
        "run": {"output_dir": str(output_dir)},
    }
    for name, upd in sections.items():
        if isinstance(upd, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **upd}
        else:
            cfg[name] = upd
    return cfg
