"""The consumed-sample audit log (``data.log_consumed: true``): ``RUN/consumed/rank{R:05d}.jsonl``.

One JSON line per optimizer step ``s`` (1-based, as checkpoint steps): ``{"step": s, "keys": [...]}``,
the samples this rank fed into that step (``shard/key``, or ``name/shard/key`` for ``data.sources``);
sequence-parallel peers log the same keys. Each line is written to the OS at once, and the file is
fsynced with each checkpoint (before it is written) and at the end. When a run starts at step ``S`` (0 for a fresh start), lines for
steps after ``S`` are dropped first from every rank's file (temp file, fsync, rename), so the union
over ranks of the lines with ``step <= N`` is exactly what checkpoint ``N`` was trained on.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["ConsumedLog", "truncate_log", "read_log"]

_NAME = re.compile(r"^rank(\d{5})\.jsonl$")


def read_log(path: Path) -> List[dict]:
    """The lines of one rank's log as dicts. A last line cut short by a kill is ignored; any other
    line that is not ``{"step": int, "keys": [str]}`` raises ``ValueError`` naming ``path:line``."""
    out = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and isinstance(rec.get("keys"), list)
        except ValueError:
            ok = False
        if not ok:
            if i == len(lines):  # no newline after it: a write cut short (it was never flushed by a checkpoint)
                break
            raise ValueError(f"{path}:{i}: not a consumed-log line {{\"step\": int, \"keys\": [...]}}; "
                             "delete the file to start its log afresh")
        out.append(rec)
    return out


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the lines of ``path`` for steps after ``last_step`` (atomically: temp file, fsync, rename)."""
    text = "".join(json.dumps(r) + "\n" for r in read_log(path) if r["step"] <= last_step)
    if text == path.read_text(encoding="utf-8"):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ConsumedLog:
    """Appends this rank's consumed keys per step; see the module doc.

    Args:
        run_dir: the run directory; ``rank``, ``world_size``: this process and the world;
        start_step: the step the run starts at (its checkpoint's; 0 for a fresh start).
    Rank 0 also truncates the logs of ranks ``>= world_size`` (left by a run on more processes)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, start_step: int):
        self.dir = Path(run_dir) / "consumed"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank{rank:05d}.jsonl"
        others: Sequence[Path] = []
        if rank == 0:
            others = [p for p in self.dir.iterdir() if _NAME.match(p.name) and int(_NAME.match(p.name)[1]) >= world_size]
        for p in [self.path, *others]:
            if p.is_file():
                truncate_log(p, start_step)
        self._f: Optional[object] = open(self.path, "a", encoding="utf-8")

    def record(self, step: int, keys: Sequence[str]) -> None:
        """Append the line of optimizer step ``step`` (handed to the OS at once; fsynced by :meth:`flush`)."""
        self._f.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")
        self._f.flush()

    def flush(self) -> None:
        """Flush and fsync the lines written so far (called before each checkpoint)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        """Flush and close. Idempotent."""
        if self._f is not None:
            self.flush()
            self._f.close()
            self._f = None
