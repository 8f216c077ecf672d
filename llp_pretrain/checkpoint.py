"""Checkpoint layout, atomic "latest" pointer, retention, resume lookup and per-rank RNG state.

``RUN/checkpoints/`` holds one DeepSpeed tag directory per save, ``stepNNNNNNNN/``, written by
``engine.save_checkpoint`` on every rank with the same tag. Next to DeepSpeed's files each tag holds
``rng_rankNNNNN.pt`` (python/numpy/torch RNG states of that rank), ``config.resolved.yaml``,
``ds_config.json`` and, written last by rank 0 after a barrier, ``run_meta.json`` (step, layout,
data position, hashes). The ``latest`` file names the newest tag whose ``run_meta.json`` exists and is
replaced atomically (temporary name, then rename) only after every rank finished saving, so an
interrupted save never becomes the latest. Only the newest ``keep`` complete tags are kept.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "tag_for",
    "step_of",
    "complete_tags",
    "read_latest",
    "resolve_resume",
    "write_json_atomic",
    "rng_state",
    "set_rng_state",
    "save_rank_rng",
    "load_rank_rng",
    "finalize_save",
    "read_meta",
    "DiskFullError",
    "reporting_full_disk",
]

LATEST = "latest"
META = "run_meta.json"


def tag_for(step: int) -> str:
    """Tag directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step{step:08d}"


def step_of(tag: str) -> Optional[int]:
    """Inverse of :func:`tag_for`; None for other names."""
    if tag.startswith("step") and tag[4:].isdigit():
        return int(tag[4:])
    return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> List[str]:
    """Tags under ``ckpt_dir`` whose save completed (``run_meta.json`` present), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None and (p / META).is_file()]
    return sorted(tags, key=step_of)


def read_latest(ckpt_dir: Path) -> Optional[str]:
    """The tag named by ``ckpt_dir/latest`` if that save completed, else None."""
    f = ckpt_dir / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag / META).is_file() else None


def read_meta(tag_dir: Path) -> Dict[str, Any]:
    """``run_meta.json`` of a tag directory. Raises ``FileNotFoundError`` if the save is incomplete."""
    f = Path(tag_dir) / META
    if not f.is_file():
        raise FileNotFoundError(f"{tag_dir}: not a complete checkpoint (no {META}); it was interrupted while saving "
                                "or is not an llp-pretrain checkpoint")
    return json.loads(f.read_text())


def resolve_resume(resume: Optional[str], run_ckpt_dir: Path) -> Optional[Tuple[Path, str]]:
    """Where to resume from: ``(checkpoints dir, tag)`` or None for a fresh start.

    ``resume`` is None (fresh), ``"auto"`` (the run's ``latest`` complete tag if any, else fresh), or a
    path: a run directory, a ``checkpoints/`` directory (its latest) or a tag directory.
    Raises ``FileNotFoundError`` naming the path when an explicit path holds no complete checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        tag = read_latest(run_ckpt_dir)
        return (run_ckpt_dir, tag) if tag else None
    p = Path(resume)
    for cand in (p / "checkpoints", p):
        tag = read_latest(cand) if cand.is_dir() else None
        if tag:
            return cand, tag
    if (p / META).is_file():
        return p.parent, p.name
    raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (expected a run directory, its "
                            f"checkpoints/ directory with a '{LATEST}' file, or a stepNNNNNNNN directory with {META})")


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) RNG states of this process."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_rank_rng(tag_dir: Path, rank: int) -> None:
    """Save this rank's RNG states into ``tag_dir/rng_rankNNNNN.pt`` (temporary name, then rename)."""
    path = tag_dir / f"rng_rank{rank:05d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, path)


def load_rank_rng(tag_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG states from ``tag_dir``; False if the file is absent."""
    path = tag_dir / f"rng_rank{rank:05d}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True


def finalize_save(ckpt_dir: Path, tag: str, meta: Dict[str, Any], keep: int) -> None:
    """Rank 0, after every rank saved: write ``run_meta.json``, point ``latest`` at ``tag`` atomically,
    then delete complete tags beyond the newest ``keep`` and incomplete tags older than ``tag``."""
    write_json_atomic(ckpt_dir / tag / META, meta)
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_dir / LATEST)
    tags = complete_tags(ckpt_dir)
    for old in tags[:-keep] if keep > 0 else []:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    cur = step_of(tag)
    for p in ckpt_dir.iterdir():
        s = step_of(p.name)
        if p.is_dir() and s is not None and s < cur and not (p / META).is_file():
            shutil.rmtree(p, ignore_errors=True)


class DiskFullError(OSError):
    """A save failed because the file system is full (``errno.ENOSPC``); ``str()`` is the whole message."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _is_disk_full(exc: BaseException, where: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    if "no space left" in text or "disk quota" in text:
        return True
    try:  # torch's zip writer says "file write failed" or "unexpected pos": look at the file system
        return shutil.disk_usage(where).free < 64 * 2 ** 20
    except OSError:
        return False


def reporting_full_disk(save_fn: Callable[[int], None], ckpt_dir: Path) -> Callable[[int], None]:
    """Wrap ``save_fn(step)`` so that a full disk ends in a :class:`DiskFullError` saying so in one
    line, naming the directory and the checkpoint that stays ``latest``; the incomplete tag directory
    is removed (it was never ``latest``) to give the space back. Other errors pass unchanged."""

    def save(step: int) -> None:
        try:
            save_fn(step)
        except (OSError, RuntimeError) as e:
            tag_dir = ckpt_dir / tag_for(step)
            if not _is_disk_full(e, ckpt_dir):
                raise
            latest = read_latest(ckpt_dir)
            if latest != tag_dir.name and not (tag_dir / META).is_file():
                shutil.rmtree(tag_dir, ignore_errors=True)
            keep = f"{ckpt_dir / latest} stays the latest checkpoint" if latest else "no earlier checkpoint exists"
            raise DiskFullError(f"no space left on the device holding {ckpt_dir} while saving checkpoint "
                                f"{tag_dir.name}; {keep}. Free space (or lower train.keep_checkpoints) and rerun "
                                "with --resume auto") from None

    return save
