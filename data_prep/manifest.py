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
from pathlib import Path
from typing import Dict, List, Optional

from .errors import DataPrepError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RUN_MARKER = ".llp-prep-run.json"      # present while a `shard` run is unfinished
PARTIAL_SUFFIX = ".partial"            # shards are written as NAME.partial, then renamed
SHARD_RE = re.compile(r"^(train|val)-(\d{6})\.tar$")
SPLITS = ("train", "val")
# Options that change how a run executes but never what it writes.
EXECUTION_ONLY_OPTIONS = ("--workers", "--parallel", "--quiet", "-q", "--overwrite")
_TAKES_VALUE = ("--workers", "--parallel")


def shard_name(split: str, index: int) -> str:
    """``train-000000.tar`` style name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    """WebDataset key (no dots) of sample ``index`` of ``split``: ``train_0000000042``."""
    return f"{split}_{index:010d}"


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


def write_json_atomic(path: Path, obj: Dict) -> None:
    """Write ``obj`` as JSON to ``path`` via ``path.tmp`` + fsync + rename."""
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: os.PathLike) -> Dict:
    """Load ``DIR/manifest.json``.

    Raises:
        DataPrepError: missing (the run did not finish: rerun ``llp-prep shard``), not JSON, or a
            ``format_version`` this code does not read.
    """
    p = Path(directory) / MANIFEST
    if not p.is_file():
        raise DataPrepError(f"{p} not found: {directory} holds no finished dataset (rerun "
                            f"`llp-prep shard ... --out {directory}`)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataPrepError(f"{p}: not valid JSON ({e}); rerun `llp-prep shard`") from e
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise DataPrepError(f"{p}: format_version {m.get('format_version') if isinstance(m, dict) else None!r} "
                            f"is not {FORMAT_VERSION}; rebuild it with this version of llp-prep")
    return m
