"""``manifest.json``: the complete description of a shard directory (see ``docs/internals.md``).

The manifest holds no timestamps and no execution-only options (``--workers``, ``--parallel``,
``--quiet``, ``--overwrite``), so the same inputs and settings give a byte-identical manifest.
It is written last, through a temporary file and a rename; a directory without it holds no
finished dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from .atomic import write_atomic, write_json_atomic  # noqa: F401  (the one atomic writer, re-exported)
from .errors import DataPrepError, check_utf8_name, os_error_message

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RUN_MARKER = ".llp-prep-run.json"      # present while a `shard` run is unfinished
PARTIAL_SUFFIX = ".partial"            # shards are written as NAME.partial, then renamed
SHARD_RE = re.compile(r"^(train|val)-(\d{6})\.tar$")
SPLITS = ("train", "val")
# Options that change how a run executes but never what it writes.
EXECUTION_ONLY_OPTIONS = ("--workers", "--parallel", "--quiet", "-q", "--overwrite",
                          "--task-index")
_TAKES_VALUE = ("--workers", "--parallel", "--task-index")


def shard_name(split: str, index: int) -> str:
    """``train-000000.tar`` style name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int, stream: Optional[int] = None) -> str:
    """WebDataset key (no dots) of sample ``index`` of ``split``: ``train_0000000042``; in stream
    ``stream`` of a merged array dataset: ``train_s00002_0000000042``."""
    if stream is None:
        return f"{split}_{index:010d}"
    return f"{split}_s{stream:05d}_{index:010d}"


def fingerprint(obj) -> str:
    """sha256 of a canonical JSON rendering of ``obj`` (settings, inputs, tokenizer hash)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def strip_execution_only(argv: Optional[List[str]]) -> Optional[List[str]]:
    """``argv`` without the options that do not affect the output (they would break determinism)."""
    if argv is None:
        return None
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in EXECUTION_ONLY_OPTIONS:
            skip = (name in _TAKES_VALUE and "=" not in a)
            continue
        out.append(a)
    return out


def ensure_dir(path: os.PathLike, option: str = "--out") -> Path:
    """Create directory ``path`` (and parents) if needed and check that files can be made in it.

    Raises:
        DataPrepError: ``path`` (or a parent) is a file, or the directory cannot be created or
            written (the message names it and the option to change).
    """
    p = Path(path)
    check_utf8_name(p, option)
    if p.exists() and not p.is_dir():
        raise DataPrepError(f"{option} {p} is a file, not a directory; remove it or choose "
                            f"another {option}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".llp-prep-probe-")
        probe.close()
    except OSError as e:
        raise DataPrepError(os_error_message(e, f"preparing {option} {p}")) from e
    return p


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_manifest_types(m: Dict, where: str) -> None:
    """Check the types of the manifest keys that ``verify``, ``stats``, ``merge`` and the loader use.

    Raises:
        DataPrepError: names the first key with a wrong type, and its value.
    """
    def bad(key: str, val, want: str) -> DataPrepError:
        shown = json.dumps(val)[:60] if not isinstance(val, (dict, list)) else type(val).__name__
        return DataPrepError(f"{where}: {key} is {shown}, expected {want}; the manifest is damaged: "
                             f"rebuild the dataset with `llp-prep shard` (or restore the file)")

    if not _is_int(m.get("seq_len"), 1):
        raise bad("seq_len", m.get("seq_len"), "an integer >= 1")
    if m.get("dtype") not in ("uint16", "uint32"):
        raise bad("dtype", m.get("dtype"), '"uint16" or "uint32"')
    tok = m.get("tokenizer")
    if not isinstance(tok, dict):
        raise bad("tokenizer", tok, "an object")
    if not _is_int(tok.get("piece_count"), 1):
        raise bad("tokenizer.piece_count", tok.get("piece_count"), "an integer >= 1")
    for k in ("pad_id", "unk_id", "bos_id", "eos_id"):
        if k in tok and not (_is_int(tok[k], -1)):
            raise bad(f"tokenizer.{k}", tok[k], "an integer (-1: not defined)")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", shards, "a list")
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            raise bad(f"shards[{i}]", sh, "an object")
        if not isinstance(sh.get("name"), str) or not SHARD_RE.match(sh["name"]):
            raise bad(f"shards[{i}].name", sh.get("name"), "a name like train-000000.tar")
        if sh.get("split") not in SPLITS:
            raise bad(f"shards[{i}].split", sh.get("split"), '"train" or "val"')
        for k in ("samples", "tokens", "bytes"):
            if not _is_int(sh.get(k)):
                raise bad(f"shards[{i}].{k}", sh.get(k), "an integer >= 0")
        if not isinstance(sh.get("sha256"), str):
            raise bad(f"shards[{i}].sha256", sh.get("sha256"), "a hex string")
        if "stream" in sh and not _is_int(sh["stream"]):
            raise bad(f"shards[{i}].stream", sh["stream"], "an integer >= 0")
    totals = m.get("totals")
    if not isinstance(totals, dict):
        raise bad("totals", totals, "an object")
    for split in SPLITS:
        t = totals.get(split)
        if not isinstance(t, dict):
            raise bad(f"totals.{split}", t, "an object")
        for k, v in t.items():
            if not _is_int(v):
                raise bad(f"totals.{split}.{k}", v, "an integer >= 0")
    if "skipped" in m and not (isinstance(m["skipped"], dict)
                               and all(_is_int(v) for v in m["skipped"].values())):
        raise bad("skipped", m["skipped"], "an object of integer counts")


def read_manifest(directory: os.PathLike) -> Dict:
    """Load ``DIR/manifest.json`` and check it (:func:`parse_manifest`).

    Raises:
        DataPrepError: missing (the run did not finish: rerun ``llp-prep shard``), unreadable, not
            JSON, a ``format_version`` this code does not read, or a key of the wrong type.
    """
    p = Path(directory) / MANIFEST
    if not p.is_file():
        if os.path.lexists(p):  # a directory, a FIFO (never opened: it would block), a device, a broken symlink
            raise DataPrepError(f"{p} is not a regular file (or a symlink that does not resolve); {directory} holds no dataset that "
                                f"llp-prep wrote (rerun `llp-prep shard ... --out DIR`)")
        raise DataPrepError(f"{p} not found: {directory} holds no finished dataset (rerun "
                            f"`llp-prep shard ... --out {directory}`)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataPrepError(os_error_message(e, "reading the manifest")) from e
    return parse_manifest(raw, str(p))


def parse_manifest(raw: bytes, where: str) -> Dict:
    """The one manifest reader: parse ``raw`` (the bytes of a ``manifest.json``, read from a file or
    fetched from a URL, ``where``) and check its ``format_version`` and key types
    (:func:`check_manifest_types`).

    Raises:
        DataPrepError: not JSON, a ``format_version`` this code does not read, or a key of the wrong
            type (the message names ``where``).
    """
    try:
        m = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataPrepError(f"{where}: not valid JSON ({e}); rerun `llp-prep shard`") from e
    if not isinstance(m, dict):
        raise DataPrepError(f"{where}: the top level is a JSON {type(m).__name__}, not an object; the "
                            f"manifest is damaged: rebuild the dataset with `llp-prep shard`")
    if "format_version" not in m:
        raise DataPrepError(f"{where}: no format_version: not a manifest written by llp-prep (rebuild "
                            f"the dataset with `llp-prep shard`)")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataPrepError(f"{where}: format_version {m.get('format_version') if isinstance(m, dict) else None!r} "
                            f"is not {FORMAT_VERSION}; rebuild it with this version of llp-prep")
    check_manifest_types(m, where)
    return m
