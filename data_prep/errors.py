"""Errors and skip accounting shared by the data_prep modules."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List


class DataPrepError(Exception):
    """A user-facing error: the message names the file/line/key/value and says what to do.

    The CLI prints it (without a traceback) and exits with status 2.
    """


# Every kind of skipped or repaired input, with the sentence the summary prints for it.
SKIP_KINDS: Dict[str, str] = {
    "empty_documents": "empty or whitespace-only documents (skipped)",
    "binary_files": "files that look binary (NUL bytes; skipped with a warning)",
    "invalid_utf8_sequences": "invalid UTF-8 byte sequences (replaced with U+FFFD or dropped, per --errors)",
    "files_with_invalid_utf8": "files that contained invalid UTF-8",
    "json_errors": "JSONL lines that are not valid JSON (skipped)",
    "json_missing_key": "JSONL records without the --text-key (skipped)",
    "json_non_string": "JSONL records whose --text-key value is not a string (skipped)",
    "lines_too_long": "JSONL lines longer than --max-line-bytes (skipped)",
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
