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
from dataclasses import dataclass, field
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
    st = _State(L=int(m["seq_len"]), dtype=np.dtype(m["dtype"]),
                piece_count=int(m["tokenizer"]["piece_count"]))
    listed = set()
    for sh in m["shards"]:
        listed.add(sh.get("name"))
        _check_shard(d, sh, st, rep, result, check_hashes)
    _check_totals(m, st.per_split, rep)
    _check_strays(d, listed, rep)
    result["ok"] = not rep.errors
    return result


@dataclass
class _State:
    """What ``verify`` carries from shard to shard: the sample shape, the keys seen, and per
    stream ``(split, stream)`` (stream None outside array merges) the next expected index and the
    last token (for the boundary check); per-split sums of the manifest's counts."""

    L: int
    dtype: np.dtype
    piece_count: int
    seen_keys: Dict[str, str] = field(default_factory=dict)
    next_index: Dict[tuple, int] = field(default_factory=dict)
    last_token: Dict[tuple, Optional[int]] = field(default_factory=dict)
    per_split: Dict[str, Dict[str, int]] = field(
        default_factory=lambda: {s: {"samples": 0, "tokens": 0, "shards": 0} for s in SPLITS})


def _check_shard(d: Path, sh: Dict, st: _State, rep: _Report, result: Dict,
                 check_hashes: bool) -> None:
    """Check one manifest shard entry and its file (its samples, sha256, counts)."""
    name, split = sh.get("name"), sh.get("split")
    if split not in SPLITS or not isinstance(name, str) or not SHARD_RE.match(name):
        rep.error(f"manifest shard entry {sh!r}: bad name or split")
        return
    st.per_split[split]["shards"] += 1
    stream = sh.get("stream")
    sk = (split, stream)
    st.next_index.setdefault(sk, 0)
    st.last_token.setdefault(sk, None)
    path = d / name
    if not path.is_file():
        rep.error(f"shard {name}: missing (listed in the manifest with {sh.get('samples')} "
                  f"samples); rerun `llp-prep shard`")
        # its samples are gone: resynchronise the split's index/boundary checks
        st.next_index[sk] += int(sh.get("samples", 0))
        st.last_token[sk] = None
        return
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
            n_samples += 1
            last_key = key
            n_tokens += _check_sample(f"shard {name} sample {key}", name, key, files, sk, st, rep)
    except (tarfile.TarError, EOFError, OSError) as e:
        after = f"after sample {last_key}" if last_key else "before its first sample"
        rep.error(f"shard {name}: truncated or corrupt tar {after} ({e})")
        st.last_token[sk] = None
    finally:
        digest = reader.finish()
        raw.close()
    if check_hashes and digest != sh.get("sha256"):
        rep.error(f"shard {name}: sha256 differs from the manifest (the file was modified)")
    if n_samples != sh.get("samples"):
        rep.error(f"shard {name}: holds {n_samples} samples, manifest says {sh.get('samples')}")
        # keep later shards' index checks aligned with the manifest
        st.next_index[sk] += int(sh.get("samples", 0)) - n_samples
    if n_tokens != sh.get("tokens") and n_samples == sh.get("samples"):
        rep.error(f"shard {name}: holds {n_tokens} tokens, manifest says {sh.get('tokens')}")
    if sh.get("tokens") != int(sh.get("samples", -1)) * (st.L + 1):
        rep.error(f"manifest shard {name}: tokens {sh.get('tokens')} != samples x (seq_len + 1)")
    st.per_split[split]["samples"] += int(sh.get("samples", 0))
    st.per_split[split]["tokens"] += int(sh.get("tokens", 0))
    result["samples"] += n_samples
    result["tokens"] += n_tokens


def _check_sample(where: str, shard: str, key: str, files: Dict[str, bytes], sk: tuple,
                  st: _State, rep: _Report) -> int:
    """Check one sample (key, members, tokens, json, boundary); returns its token count (0 when
    its tokens do not decode to the expected shape)."""
    if "." in key or not key:
        rep.error(f"{where}: bad key")
    if key in st.seen_keys:
        rep.error(f"{where}: duplicate key (also in shard {st.seen_keys[key]})")
    st.seen_keys[key] = shard
    exts = sorted(files)
    if exts != ["json", "tokens.npy"]:
        rep.error(f"{where}: holds {exts}, expected ['json', 'tokens.npy']")
        return 0
    try:
        arr = np.load(io.BytesIO(files["tokens.npy"]), allow_pickle=False)
    except Exception as e:
        rep.error(f"{where}: tokens.npy does not decode ({e})")
        return 0
    L = st.L
    if arr.dtype != st.dtype or arr.shape != (L + 1,):
        rep.error(f"{where}: tokens.npy is {arr.dtype}{list(arr.shape)}, expected "
                  f"{st.dtype}[{L + 1}]")
        return 0
    _check_sample_json(where, key, files["json"], arr, sk, st, rep)
    if int(arr.max(initial=0)) >= st.piece_count:
        rep.error(f"{where}: token id {int(arr.max())} >= piece_count {st.piece_count}")
    if st.last_token[sk] is not None and int(arr[0]) != st.last_token[sk]:
        rep.error(f"{where}: first token {int(arr[0])} is not the previous sample's "
                  f"last token {st.last_token[sk]} (samples out of order or corrupted)")
    st.last_token[sk] = int(arr[-1])
    st.next_index[sk] += 1
    return int(arr.size)


def _check_sample_json(where: str, key: str, raw: bytes, arr: np.ndarray, sk: tuple, st: _State,
                       rep: _Report) -> None:
    """The sample's json: checksum of its tokens, split/index/stream, key, document spans."""
    split, stream = sk
    L, index = st.L, st.next_index[sk]
    try:
        meta = json.loads(raw.decode("utf-8"))
    except Exception as e:
        rep.error(f"{where}: json does not decode ({e})")
        return
    if not isinstance(meta, dict):
        rep.error(f"{where}: json is not an object")
        return
    digest = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
    if meta.get("tokens_blake2b") != digest:
        rep.error(f"{where}: tokens differ from the checksum in its json (corrupted tokens)")
    if meta.get("split") != split or meta.get("index") != index or meta.get("stream") != stream:
        rep.error(f"{where}: json says split {meta.get('split')!r} index {meta.get('index')!r} "
                  f"stream {meta.get('stream')!r}, expected {split!r} {index} {stream!r}")
    elif key != sample_key(split, index, stream):
        rep.error(f"{where}: key should be {sample_key(split, index, stream)}")
    docs = meta.get("docs")
    if not isinstance(docs, list) or sum(x[2] for x in docs
                                         if isinstance(x, list) and len(x) == 3) != L + 1:
        rep.error(f"{where}: json docs do not cover the {L + 1} tokens")


def _check_totals(m: Dict, per_split: Dict, rep: _Report) -> None:
    """The manifest's per-split totals against the sums of its shard entries."""
    for s in SPLITS:
        t = m["totals"].get(s, {})
        for k in ("samples", "tokens", "shards"):
            if t.get(k) != per_split[s][k]:
                rep.error(f"manifest totals.{s}.{k} = {t.get(k)} but its shards add up to "
                          f"{per_split[s][k]}")
        for k in ("documents", "text_bytes", "text_tokens"):
            if not isinstance(t.get(k), int):
                rep.error(f"manifest totals.{s}.{k} missing")


def _check_strays(d: Path, listed: set, rep: _Report) -> None:
    """Warn about shard files the manifest does not list and partial files of a killed run."""
    for p in sorted(d.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in listed:
            rep.warnings.append(f"{p.name}: shard file not listed in the manifest (ignored by "
                                f"the loader)")
        elif p.name.endswith(PARTIAL_SUFFIX):
            rep.warnings.append(f"{p.name}: partial file of an interrupted run")
