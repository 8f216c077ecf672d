"""The one atomic file writer of the project (``data_prep`` and ``llp_pretrain`` both use it):
nothing half-written, ever -- a temporary name next to the target, fsync, then rename.

Kept free of other imports so that ``data_prep`` stays usable without ``llp_pretrain`` and
``llp_pretrain`` (checkpoints, configs, results) shares the same code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_json_atomic"]


def write_atomic(path: os.PathLike, write) -> None:
    """Write ``path`` via a temporary file (named after ``path`` and this process): ``write(f)`` fills
    the binary file object, then fsync + rename. The temporary file is removed if anything fails
    (a full disk), so either the old file or the complete new one is there.

    Raises:
        OSError: the write failed, with ``filename`` set to ``path`` (the CLI turns it into one line).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)       # a failed write() does not say which file
        raise


def write_json_atomic(path: os.PathLike, obj: Any, indent: int = 1, sort_keys: bool = False) -> None:
    """Write ``obj`` as UTF-8 JSON (and a final newline) to ``path`` with :func:`write_atomic`.
    Raises ``TypeError`` for an object JSON cannot hold (before anything is written), ``OSError`` as
    :func:`write_atomic` does."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
