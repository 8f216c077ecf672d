"""Errors and skip accounting shared by the data_prep modules."""
from __future__ import annotations

import errno
import os
from collections import Counter
from typing import Dict, List, Optional


class DataPrepError(Exception):
    """A user-facing error: the message names the file/line/key/value and says what to do.

    The CLI prints it (without a traceback) and exits with status 2.
    """


def os_error_message(e: OSError, doing: str = "", hint: str = "") -> str:
    """One line for an ``OSError``: the file, what failed, and what to do.

    ``ENOSPC`` says "no space left on <path>" and that the same command can simply be rerun;
    ``EFBIG`` (a file-size limit) and the permission and not-a-directory kinds get their own advice.
    """
    known = e.filename is not None
    path = printable(e.filename) if known else "the output"
    what = f" while {doing}" if doing else ""
    rerun = "then rerun the same command (it redoes the unfinished work cleanly)"
    if e.errno == errno.ENOSPC:
        where = f"the device holding {path}" if known else "the output device"
        return f"no space left on {where}{what}; free space or choose another --out, {rerun}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded for {path}{what}; free space or choose another --out, {rerun}"
    if e.errno == errno.EFBIG:
        return f"{path}: file too large{what} (a file-size limit, `ulimit -f`); raise the limit " \
               f"or lower --samples-per-shard, {rerun}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied{what}; fix its permissions or choose another path"
    if e.errno == errno.EROFS:
        return f"{path}: read-only file system{what}; choose a writable path"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path}: a file is in the way{what} (a directory is needed); remove it or " \
               f"choose another path"
    msg = e.strerror or str(e)
    tail = f"; {hint}" if hint else ""
    return f"{path}: {msg}{what}{tail}"


def printable(path: object) -> str:
    """``path`` as text that can always be printed and stored (undecodable bytes escaped)."""
    s = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if not _has_surrogates(s):
        return s
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_utf8_name(path: object, what: str = "input") -> Optional[str]:
    """Raise ``DataPrepError`` if ``path`` is not valid UTF-8 (the manifest records names as
    UTF-8 JSON and the split hashes them)."""
    s = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if _has_surrogates(s):
        raise DataPrepError(f"{what} {printable(s)}: the name is not valid UTF-8; rename it "
                            f"(e.g. `convmv -f latin1 -t utf-8 --notest`) or leave it out")
    return s


# Every kind of skipped or repaired input, with the sentence the summary prints for it.
SKIP_KINDS: Dict[str, str] = {
    "unreadable_directories": "sub-directories that could not be listed (skipped with a warning)",
    "dangling_links": "symbolic links whose target does not exist (skipped with a warning)",
    "special_files": "FIFOs, sockets and device files (not read; skipped with a warning)",
    "directory_loops": "directory links leading back to a directory already walked (skipped "
                       "with a warning)",
    "empty_documents": "empty or whitespace-only documents (skipped)",
    "binary_files": "files that look binary (NUL bytes; skipped with a warning)",
    "invalid_utf8_sequences": "invalid UTF-8 byte sequences (replaced with U+FFFD or dropped, per --errors)",
    "files_with_invalid_utf8": "files that contained invalid UTF-8",
    "json_errors": "JSONL lines that are not valid JSON (skipped)",
    "json_missing_key": "JSONL records without the --text-key (skipped)",
    "json_non_string": "JSONL records whose --text-key value is not a string (skipped)",
    "lines_too_long": "JSONL lines longer than --max-line-bytes (skipped)",
    "invalid_unicode": "lone surrogates (\\ud800-\\udfff escapes) in JSON / Parquet text, not "
                       "valid Unicode (replaced with U+FFFD or dropped, per --errors)",
    "parquet_missing_column": "Parquet files without the --text-key column (skipped)",
    "parquet_non_string": "Parquet rows whose --text-key value is null or not a string (skipped)",
    "space_symbol_characters": "U+2581 characters in the text (SentencePiece's space symbol: "
                               "kept, but they decode as a space)",
    "dropped_tail_tokens": "tokens at the end of a split too few for one more sample (dropped)",
}


class SkipCounter:
    """Counts of skipped/repaired input by kind, plus a few examples (file:line) per kind."""

    MAX_EXAMPLES = 5

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}

    def add(self, kind: str, n: int = 1, where: str = "") -> None:
        if kind not in SKIP_KINDS:
            raise KeyError(f"unknown skip kind {kind!r}")
        if n <= 0:
            return
        self.counts[kind] += n
        if where:
            ex = self.examples.setdefault(kind, [])
            if len(ex) < self.MAX_EXAMPLES:
                ex.append(where)

    def as_dict(self) -> Dict[str, int]:
        """All kinds (zeros included) in a fixed order, for the manifest."""
        return {k: int(self.counts.get(k, 0)) for k in SKIP_KINDS}

    def summary_lines(self) -> List[str]:
        lines = []
        for kind, text in SKIP_KINDS.items():
            n = self.counts.get(kind, 0)
            ex = self.examples.get(kind)
            tail = f"  e.g. {', '.join(ex)}" if (n and ex) else ""
            lines.append(f"  {kind:28s} {n:>10d}  {text}{tail}")
        return lines
