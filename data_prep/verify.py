"""``llp-prep verify DIR``: re-hash every shard, decode every sample, check every count.

Reads the tars with the standard ``tarfile`` module (not with the writer's code), grouping members
into samples the way WebDataset does (key = file name up to its first dot).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import DataPrepError
from .manifest import MANIFEST, PARTIAL_SUFFIX, SHARD_RE, SPLITS, read_manifest, sample_key

MAX_ERRORS = 200
_REQUIRED = ("format_version", "seq_len", "dtype", "tokenizer", "shards", "totals")


class _Report:
    def __init__(self) -> None:
        self.errors: List[str] = []
        self.warnings: List[str] = []

    def error(self, msg: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)
        elif len(self.errors) == MAX_ERRORS:
            self.errors.append("... more errors not shown")


class _HashingReader:
    """Read-only file wrapper that sha256-hashes what is read (one pass: hash + parse)."""

    def __init__(self, f) -> None:
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b

    def finish(self) -> str:
        for b in iter(lambda: self.f.read(1 << 20), b""):
            self.h.update(b)
        return self.h.hexdigest()


def _iter_samples(fileobj):
    """Yield ``(key, {ext: bytes})`` per sample of a tar stream, in member order."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        key, files = None, {}
        for member in tf:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            k, _, ext = base.partition(".")
            f = tf.extractfile(member)
            data = f.read() if f is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated "
                                        f"({len(data)} of {member.size} bytes)")
            if key is not None and k != key:
                yield key, files
                files = {}
            key = k
            if ext in files:
                raise tarfile.ReadError(f"member {member.name} appears twice in a row")
            files[ext] = data
        if key is not None:
            yield key, files


def verify_dataset(directory: os.PathLike, check_hashes: bool = True) -> Dict:
    """Check a shard directory against its ``manifest.json``.

    Checks: every listed shard exists, has the listed byte size and sha256; every sample decodes
    (``tokens.npy`` of ``dtype[seq_len + 1]`` with ids < ``piece_count``, ``json`` with the right
    split/index and the blake2b of its tokens); keys are unique and dot-free; consecutive samples of
    a split share their boundary token; per-shard and per-split counts match the manifest.

    Returns:
        ``{"ok": bool, "errors": [str], "warnings": [str], "shards": int, "samples": int,
        "tokens": int}``; each error names the shard and, where it can, the sample key.
    Raises:
        Nothing for bad shards (they are reported); ``DataPrepError`` if ``directory`` does not
        exist or its manifest is missing, not JSON or has keys of the wrong type.
    """
    d = Path(directory)
    if not d.is_dir():
        raise DataPrepError(f"{d} is not a directory")
    rep = _Report()
    result = {"ok": False, "errors": rep.errors, "warnings": rep.warnings, "shards": 0,
              "samples": 0, "tokens": 0}
    m = read_manifest(d)   # a missing or damaged manifest is a DataPrepError (exit status 2)
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        rep.error(f"{d / MANIFEST}: missing keys {missing}")
        return result
    L = int(m["seq_len"])
    dtype = np.dtype(m["dtype"])
    piece_count = int(m["tokenizer"]["piece_count"])
    seen_keys: Dict[str, str] = {}
    per_split = {s: {"samples": 0, "tokens": 0, "shards": 0} for s in SPLITS}
    # index and boundary checks run per stream: (split, stream), stream None outside array merges
    next_index: Dict[tuple, int] = {}
    last_token: Dict[tuple, Optional[int]] = {}
    listed = set()

    for sh in m["shards"]:
        name, split = sh.get("name"), sh.get("split")
        listed.add(name)
        if split not in SPLITS or not isinstance(name, str) or not SHARD_RE.match(name):
            rep.error(f"manifest shard entry {sh!r}: bad name or split")
            continue
        per_split[split]["shards"] += 1
        stream = sh.get("stream")
        sk = (split, stream)
        next_index.setdefault(sk, 0)
        last_token.setdefault(sk, None)
        path = d / name
        if not path.is_file():
            rep.error(f"shard {name}: missing (listed in the manifest with {sh.get('samples')} "
                      f"samples); rerun `llp-prep shard`")
            # its samples are gone: resynchronise the split's index/boundary checks
            next_index[sk] += int(sh.get("samples", 0))
            last_token[sk] = None
            continue
        result["shards"] += 1
        size = path.stat().st_size
        if "bytes" in sh and size != sh["bytes"]:
            rep.error(f"shard {name}: {size} bytes on disk, manifest says {sh['bytes']} "
                      f"(truncated or replaced)")
        n_samples = n_tokens = 0
        last_key = None
        raw = open(path, "rb")
        reader = _HashingReader(raw)
        try:
            for key, files in _iter_samples(reader):
                where = f"shard {name} sample {key}"
                if "." in key or not key:
                    rep.error(f"{where}: bad key")
                if key in seen_keys:
                    rep.error(f"{where}: duplicate key (also in shard {seen_keys[key]})")
                seen_keys[key] = name
                n_samples += 1
                last_key = key
                exts = sorted(files)
                if exts != ["json", "tokens.npy"]:
                    rep.error(f"{where}: holds {exts}, expected ['json', 'tokens.npy']")
                    continue
                try:
                    arr = np.load(io.BytesIO(files["tokens.npy"]), allow_pickle=False)
                except Exception as e:
                    rep.error(f"{where}: tokens.npy does not decode ({e})")
                    continue
                if arr.dtype != dtype or arr.shape != (L + 1,):
                    rep.error(f"{where}: tokens.npy is {arr.dtype}{list(arr.shape)}, expected "
                              f"{dtype}[{L + 1}]")
                    continue
                n_tokens += int(arr.size)
                try:
                    meta = json.loads(files["json"].decode("utf-8"))
                except Exception as e:
                    rep.error(f"{where}: json does not decode ({e})")
                    meta = None
                if isinstance(meta, dict):
                    digest = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
                    if meta.get("tokens_blake2b") != digest:
                        rep.error(f"{where}: tokens differ from the checksum in its json "
                                  f"(corrupted tokens)")
                    if meta.get("split") != split or meta.get("index") != next_index[sk] \
                            or meta.get("stream") != stream:
                        rep.error(f"{where}: json says split {meta.get('split')!r} index "
                                  f"{meta.get('index')!r} stream {meta.get('stream')!r}, expected "
                                  f"{split!r} {next_index[sk]} {stream!r}")
                    elif key != sample_key(split, next_index[sk], stream):
                        rep.error(f"{where}: key should be "
                                  f"{sample_key(split, next_index[sk], stream)}")
                    docs = meta.get("docs")
                    if not isinstance(docs, list) or sum(x[2] for x in docs
                                                         if isinstance(x, list) and len(x) == 3) != L + 1:
                        rep.error(f"{where}: json docs do not cover the {L + 1} tokens")
                elif meta is not None:
                    rep.error(f"{where}: json is not an object")
                if int(arr.max(initial=0)) >= piece_count:
                    rep.error(f"{where}: token id {int(arr.max())} >= piece_count {piece_count}")
                if last_token[sk] is not None and int(arr[0]) != last_token[sk]:
                    rep.error(f"{where}: first token {int(arr[0])} is not the previous sample's "
                              f"last token {last_token[sk]} (samples out of order or corrupted)")
                last_token[sk] = int(arr[-1])
                next_index[sk] += 1
        except (tarfile.TarError, EOFError, OSError) as e:
            after = f"after sample {last_key}" if last_key else "before its first sample"
            rep.error(f"shard {name}: truncated or corrupt tar {after} ({e})")
            last_token[sk] = None
        finally:
            digest = reader.finish()
            raw.close()
        if check_hashes and digest != sh.get("sha256"):
            rep.error(f"shard {name}: sha256 differs from the manifest (the file was modified)")
        if n_samples != sh.get("samples"):
            rep.error(f"shard {name}: holds {n_samples} samples, manifest says {sh.get('samples')}")
            # keep later shards' index checks aligned with the manifest
            next_index[sk] += int(sh.get("samples", 0)) - n_samples
        if n_tokens != sh.get("tokens") and n_samples == sh.get("samples"):
            rep.error(f"shard {name}: holds {n_tokens} tokens, manifest says {sh.get('tokens')}")
        if sh.get("tokens") != int(sh.get("samples", -1)) * (L + 1):
            rep.error(f"manifest shard {name}: tokens {sh.get('tokens')} != samples x (seq_len + 1)")
        per_split[split]["samples"] += int(sh.get("samples", 0))
        per_split[split]["tokens"] += int(sh.get("tokens", 0))
        result["samples"] += n_samples
        result["tokens"] += n_tokens

    for s in SPLITS:
        t = m["totals"].get(s, {})
        for k in ("samples", "tokens", "shards"):
            if t.get(k) != per_split[s][k]:
                rep.error(f"manifest totals.{s}.{k} = {t.get(k)} but its shards add up to "
                          f"{per_split[s][k]}")
        for k in ("documents", "text_bytes", "text_tokens"):
            if not isinstance(t.get(k), int):
                rep.error(f"manifest totals.{s}.{k} missing")
    for p in sorted(d.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in listed:
            rep.warnings.append(f"{p.name}: shard file not listed in the manifest (ignored by "
                                f"the loader)")
        elif p.name.endswith(PARTIAL_SUFFIX):
            rep.warnings.append(f"{p.name}: partial file of an interrupted run")
    result["ok"] = not rep.errors
    return result
