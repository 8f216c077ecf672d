"""Checkpoint layout, atomic "latest" pointer, retention, resume lookup and per-rank RNG state.

``RUN/checkpoints/`` holds one DeepSpeed tag directory per save, ``stepNNNNNNNN/``, written by
``engine.save_checkpoint`` on every rank with the same tag. Next to DeepSpeed's files each tag holds
``rng_rankNNNNN.safetensors`` (python/numpy/torch RNG states of that rank, as tensors and JSON:
nothing that can carry code), ``config.resolved.yaml``,
``ds_config.json`` and, written last by rank 0 after a barrier, ``run_meta.json`` (step, layout,
data position, hashes). The ``latest`` file names the newest tag whose ``run_meta.json`` exists and is
replaced atomically (temporary name, then rename) only after every rank finished saving, so an
interrupted save never becomes the latest. Only the newest ``keep`` complete tags are kept.

Trust boundary: DeepSpeed stores model and optimizer states with ``torch.save`` (pickle). Every
``torch.load`` that reads a checkpoint, ours and DeepSpeed's, runs inside :func:`weights_only_loads`:
torch's weights-only unpickler with an explicit allow-list of the three DeepSpeed classes its files
hold, so a planted pickle is refused instead of run. :func:`check_loadable` scans a tag's pickle
files first and names any file that holds other Python objects.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from data_prep.atomic import write_atomic, write_json_atomic  # the one atomic writer (write_json_atomic re-exported)

__all__ = [
    "tag_for",
    "step_of",
    "complete_tags",
    "read_latest",
    "newest_tag",
    "resolve_resume",
    "write_json_atomic",
    "rng_state",
    "set_rng_state",
    "save_rank_rng",
    "load_rank_rng",
    "finalize_save",
    "read_meta",
    "UntrustedCheckpointError",
    "weights_only_loads",
    "check_loadable",
    "safe_torch_load",
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


def complete_tags(ckpt_dir: Path) -> List[str]:
    """Tags under ``ckpt_dir`` whose save completed (``run_meta.json`` present), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None and (p / META).is_file()]
    return sorted(tags, key=step_of)


def read_latest(ckpt_dir: Path) -> Optional[str]:
    """The tag named by ``ckpt_dir/latest`` if it is a ``stepNNNNNNNN`` directory of ``ckpt_dir`` whose
    save completed, else None."""
    f = ckpt_dir / LATEST
    if not f.is_file():
        return None
    try:
        tag = f.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if step_of(tag) is None or "/" in tag:
        return None
    return tag if (ckpt_dir / tag / META).is_file() else None


def newest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag to continue from: ``latest`` when valid, else the newest complete tag (a save killed
    between ``run_meta.json`` and ``latest``, or a lost ``latest``; said on stderr), else None."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        tags = complete_tags(ckpt_dir)
        if tags:
            tag = tags[-1]
            print(f"[llp-pretrain] warning: {ckpt_dir / LATEST} is missing or does not name a complete checkpoint; "
                  f"using the newest complete one, {tag}", file=sys.stderr, flush=True)
    return tag


def read_meta(tag_dir: Path) -> Dict[str, Any]:
    """``run_meta.json`` of a tag directory. Raises ``FileNotFoundError`` if the save is incomplete."""
    f = Path(tag_dir) / META
    if not f.is_file():
        raise FileNotFoundError(f"{tag_dir}: not a complete checkpoint (no {META}); it was interrupted while saving "
                                "or is not an llp-pretrain checkpoint")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e}); this checkpoint is damaged, resume from an earlier one") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{f}: expected a JSON object with an integer 'step'; this checkpoint is damaged, resume "
                         "from an earlier one")
    for key, ok, want in (("zero_stage", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 3,
                           "an integer 0-3"),
                          ("skipped_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                           "an integer >= 0"),
                          ("model", lambda v: isinstance(v, dict), "an object (the model config)"),
                          ("hashes", lambda v: isinstance(v, dict), "an object")):
        if key in meta and not ok(meta[key]):
            raise ValueError(f"{f}: {key} is {json.dumps(meta[key])[:60]}, expected {want}; this checkpoint is "
                             "damaged, resume from an earlier one")
    return meta


def resolve_resume(resume: Optional[str], run_ckpt_dir: Path) -> Optional[Tuple[Path, str]]:
    """Where to resume from: ``(checkpoints dir, tag)`` or None for a fresh start.

    ``resume`` is None (fresh), ``"auto"`` (the run's ``latest`` complete tag if any, else fresh), or a
    path: a run directory, a ``checkpoints/`` directory (its latest) or a tag directory.
    Raises ``FileNotFoundError`` naming the path when an explicit path holds no complete checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        tag = newest_tag(run_ckpt_dir)
        return (run_ckpt_dir, tag) if tag else None
    p = Path(resume)
    for cand in (p / "checkpoints", p):
        tag = newest_tag(cand) if cand.is_dir() else None
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


def _rng_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank:05d}.safetensors"


def save_rank_rng(tag_dir: Path, rank: int) -> None:
    """Save this rank's RNG states into ``tag_dir/rng_rankNNNNN.safetensors`` (temporary name, then
    rename): torch states as uint8 tensors, the numpy key as an int64 tensor, the rest as JSON metadata."""
    from safetensors.torch import save_file

    st = rng_state()
    name, key, pos, has_gauss, gauss = st["numpy"]
    version, internal, py_gauss = st["python"]
    tensors = {"torch": st["torch"], "numpy_key": torch.from_numpy(np.asarray(key, dtype=np.int64))}
    if "cuda" in st:
        tensors["cuda"] = st["cuda"]
    meta = {"python": json.dumps([version, list(internal), py_gauss]),
            "numpy": json.dumps([name, int(pos), int(has_gauss), float(gauss)])}
    path = _rng_path(tag_dir, rank)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_rank_rng(tag_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG states from ``tag_dir``; False if the file is absent.

    Raises ``ValueError`` naming the file when it is not a valid RNG-state file (no code is run: it is
    read with safetensors and JSON), or when only a pickled ``rng_rankNNNNN.pt`` of an older version exists."""
    from safetensors import safe_open

    path = _rng_path(tag_dir, rank)
    if not path.is_file():
        legacy = Path(tag_dir) / f"rng_rank{rank:05d}.pt"
        if legacy.is_file():
            raise ValueError(f"{legacy}: RNG state pickled by an older llp-pretrain; it is not loaded (a pickle can "
                             "run code). Continue from the weights instead: `llp-pretrain export` this checkpoint "
                             "and start a new run with --set train.init_from=EXPORT_DIR")
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        version, internal, py_gauss = json.loads(meta["python"])
        name, pos, has_gauss, gauss = json.loads(meta["numpy"])
        st = {"python": (int(version), tuple(int(x) for x in internal), py_gauss),
              "numpy": (str(name), tensors["numpy_key"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                        float(gauss)),
              "torch": tensors["torch"].to(torch.uint8)}
        if "cuda" in tensors:
            st["cuda"] = tensors["cuda"].to(torch.uint8)
        set_rng_state(st)
    except Exception as e:  # any malformed content: one line naming the file
        raise ValueError(f"{path}: not a valid RNG-state file ({type(e).__name__}: {e}); restore it from a copy "
                         "or resume from an earlier checkpoint") from None
    return True


class UntrustedCheckpointError(ValueError):
    """A checkpoint file holds Python objects outside the allow-list (it could run code when loaded)."""


def _deepspeed_safe_globals() -> List[Any]:
    """The classes DeepSpeed's own checkpoint files hold (ZeRO 0-3, fp32/bf16): plain data holders."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads():
    """Within the block every ``torch.load`` (including DeepSpeed's, which pass ``weights_only=False``)
    uses torch's weights-only unpickler (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) with DeepSpeed's data
    classes allowed: loading cannot run code. Restores the environment afterwards."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _check_file(f: Path) -> None:
    if not f.is_file():  # a FIFO or device would block or never end
        raise UntrustedCheckpointError(f"{f}: not a regular file; it is not loaded. Resume from an earlier checkpoint")
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_safe_globals()}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
    except Exception as e:
        raise UntrustedCheckpointError(f"{f}: not a checkpoint file written by torch.save ({type(e).__name__}: {e}); "
                                       "it is not loaded. Resume from an earlier checkpoint") from None
    bad = sorted(set(found) - allowed)
    if bad:
        raise UntrustedCheckpointError(
            f"{f}: refused to load: it holds Python objects ({', '.join(bad[:5])}) that could run code. Resume only "
            "from checkpoints you wrote yourself; share models with `llp-pretrain export` (safetensors)")


def check_loadable(tag_dir: Path, recursive: bool = False) -> None:
    """Scan every ``*.pt`` file of a checkpoint tag (with ``recursive``, of its subdirectories too: a
    universal checkpoint's ``zero/<param>/*.pt``), reading the pickle opcodes, never running them,
    and raise :class:`UntrustedCheckpointError` naming the first file that holds a Python global
    outside DeepSpeed's allow-list, or that is not a readable torch file."""
    for f in sorted(Path(tag_dir).rglob("*.pt") if recursive else Path(tag_dir).glob("*.pt")):
        _check_file(f)


def safe_torch_load(path: Path, map_location: str = "cpu") -> Any:
    """``torch.load`` of one checkpoint file, scanned first and then read with the weights-only
    unpickler (:func:`weights_only_loads`). Raises :class:`UntrustedCheckpointError` naming the file."""
    _check_file(Path(path))
    with weights_only_loads():
        return torch.load(Path(path), map_location=map_location, weights_only=True)


def finalize_save(ckpt_dir: Path, tag: str, meta: Dict[str, Any], keep: int) -> None:
    """Rank 0, after every rank saved: write ``run_meta.json``, point ``latest`` at ``tag`` atomically,
    then delete complete tags beyond the newest ``keep`` and incomplete tags older than ``tag``."""
    write_json_atomic(ckpt_dir / tag / META, meta)
    write_atomic(ckpt_dir / LATEST, lambda f: f.write(f"{tag}\n".encode("utf-8")))
    tags = complete_tags(ckpt_dir)
    for old in tags[:-keep] if keep > 0 else []:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            for copy in (f"{old}.universal", f".{old}.universal.partial"):  # its converted copy, if any
                shutil.rmtree(ckpt_dir / copy, ignore_errors=True)
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
