"""Resume on another process layout: DeepSpeed universal checkpoints, converted once and cached.

ZeRO 1-3 partition the fp32 master weights and Adam moments over the sequence x data-parallel
group, which is the whole world (``parallel/groups.py``: ``get_sequence_data_parallel_group``). A
checkpoint therefore loads as it is whenever the world size is the same (for example dp 2 x sp 1
-> dp 1 x sp 2); another world size needs DeepSpeed's universal checkpoint: one file per parameter
and state (``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``), written by
``deepspeed.checkpoint.ds_to_universal`` and loaded with ``"checkpoint": {"load_universal": true}``.
ZeRO-0 (fp32, and bf16, where DeepSpeed wraps AdamW whole) keeps the whole optimizer state in
``mp_rank_00_model_states.pt``, which loads on any world size; a ZeRO-0 checkpoint with per-rank
optimizer files (DeepSpeed's ``BF16_Optimizer``) is refused.

Cache (contract, also in ``docs/training.md``): ``RUN/checkpoints/stepNNNNNNNN.universal/`` holds
the converted tag as ``stepNNNNNNNN/`` (DeepSpeed's ``load_dir``/``tag`` pair) and ``converted.json``,
written last, before the directory gets its name: the conversion is built in
``.stepNNNNNNNN.universal.partial/`` and renamed when complete. A leftover ``.partial`` directory (a
killed conversion) is removed and the conversion redone; a complete copy is reused when its marker
names the sha256 of the tag's ``run_meta.json`` (a tag saved again under the same name is converted
again). The original tag is only read. Conversion and loads run under :func:`llp_pretrain.checkpoint.weights_only_loads`
after every ``*.pt`` file (the original tag's and the converted copy's) was scanned
(:func:`~llp_pretrain.checkpoint.check_loadable`), so nothing loaded can run code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from llp_pretrain import checkpoint as ckpt

__all__ = ["needs_universal", "universal_dir", "convert_to_universal", "prepare_universal", "reseed_for_layout",
           "describe_rng"]

MARKER = "converted.json"
SUFFIX = ".universal"


def needs_universal(meta: Dict[str, Any], world_size: int, tag_dir: Path) -> bool:
    """True when the checkpoint must be converted to a universal checkpoint to load on
    ``world_size`` processes: ZeRO 1-3 written by another world size.

    ZeRO-0 (fp32, and bf16, where DeepSpeed wraps AdamW whole) saves the optimizer state once in
    ``mp_rank_00_model_states.pt``: it loads on any world size. Raises ``ValueError`` (the way out
    included) for a ZeRO-0 checkpoint with per-rank optimizer files (DeepSpeed's ``BF16_Optimizer``,
    chosen at stage 0 only under pipeline parallelism), which DeepSpeed's universal loading does not
    cover at stage 0, and for a ZeRO checkpoint with fewer optimizer-state files than ranks."""
    old_world = int(meta.get("layout", {}).get("world_size", world_size))
    if old_world == world_size:
        return False
    stage = int(meta.get("zero_stage", 0))
    if stage == 0 and any(Path(tag_dir).glob("*optim_states.pt")):
        raise ValueError(f"{tag_dir} is a ZeRO-0 checkpoint whose optimizer state is split over {old_world} ranks "
                         f"(DeepSpeed's BF16_Optimizer); it cannot be loaded on world size {world_size}. Relaunch "
                         f"with {old_world} processes, or train with ZeRO 1-3 (configs/deepspeed/zero1.json) to be "
                         "able to change the number of GPUs")
    if stage > 0:
        found = len(list(Path(tag_dir).glob("*zero_pp_rank_*_optim_states.pt")))
        if found != old_world:
            raise ValueError(f"{tag_dir} holds {found} ZeRO optimizer-state files (*zero_pp_rank_*_optim_states.pt) "
                             f"but was written by {old_world} ranks: it is incomplete or damaged. Resume from an "
                             "earlier checkpoint")
    return stage > 0


def universal_dir(tag_dir: Path) -> Path:
    """Where the converted copy of ``tag_dir`` lives: ``<tag_dir>.universal`` next to it."""
    tag_dir = Path(tag_dir)
    return tag_dir.parent / (tag_dir.name + SUFFIX)


def _source_id(tag_dir: Path) -> str:
    """sha256 of the tag's ``run_meta.json`` (written last by each save, with its time): identifies the
    save a copy was made from, so a tag saved again under the same name never reuses an old copy."""
    return hashlib.sha256((Path(tag_dir) / ckpt.META).read_bytes()).hexdigest()


def _complete(out: Path, tag_dir: Path) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("run_meta_sha256") == _source_id(tag_dir)
            and (out / tag_dir.name).is_dir())


def convert_to_universal(tag_dir: Path, quiet: bool = True) -> Tuple[Path, bool]:
    """Convert DeepSpeed tag directory ``tag_dir`` with ``deepspeed.checkpoint.ds_to_universal``
    (in this process, one worker) unless a complete copy exists. Returns ``(universal_dir, converted)``.

    Raises :class:`~llp_pretrain.checkpoint.UntrustedCheckpointError` for a file that could run code,
    ``RuntimeError`` naming the directory when DeepSpeed's conversion fails (the partial copy is removed)."""
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = Path(tag_dir)
    out = universal_dir(tag_dir)
    if _complete(out, tag_dir):
        return out, False
    if out.exists():  # no marker, or a copy of an earlier save under the same tag name: not to be trusted
        shutil.rmtree(out)
    partial = tag_dir.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a conversion killed halfway: start over
    ckpt.check_loadable(tag_dir)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(partial / tag_dir.name),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    t0 = time.time()
    try:
        with ckpt.weights_only_loads(), open(os.devnull, "w") as sink, \
                redirect_stdout(sink if quiet else sys.stderr), redirect_stderr(sink if quiet else sys.stderr):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed ({type(e).__name__}: {e}); the "
                           f"checkpoint is unchanged. Relaunch with its original number of processes") from None
    ckpt.check_loadable(partial / tag_dir.name, recursive=True)
    ckpt.write_json_atomic(partial / MARKER, {"source": tag_dir.name, "run_meta_sha256": _source_id(tag_dir),
                                              "seconds": round(time.time() - t0, 3),
                                              "deepspeed": _ds_version(), "time": time.time()})
    os.replace(partial, out)
    return out, True


def _ds_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def prepare_universal(start, d, console) -> None:
    """When ``start.universal`` is set: rank 0 converts (or reuses) the cached copy, every rank learns
    the outcome (one all-reduce: an error ends all ranks, none waits), then ``start.load_from`` points
    at the copy. Collective: every rank calls it. Raises ``RuntimeError`` / ``UntrustedCheckpointError``."""
    from .distributed import all_reduce

    if not start.universal:
        return
    tag_dir = start.where[0] / start.where[1]
    err, out = "", universal_dir(tag_dir)
    if d.rank == 0:
        try:
            t0 = time.time()
            out, converted = convert_to_universal(tag_dir)
            what = f"converted to {out} in {time.time() - t0:.1f} s" if converted else f"reusing {out}"
            console(f"[llp-pretrain] {tag_dir} was written with world size {start.meta['layout'].get('world_size')}; "
                    f"this run has {d.world_size}: {what} (DeepSpeed universal checkpoint)")
        except Exception as e:  # every rank must learn of it
            err = str(e)
    failed, = all_reduce([1.0 if err else 0.0], op="max", device=d.reduce_device)
    if failed:
        raise RuntimeError(err or f"converting {tag_dir} failed on rank 0 (see its message)")
    ckpt.check_loadable(out / tag_dir.name, recursive=True)
    start.load_from = (out, tag_dir.name)


def reseed_for_layout(seed: int, step: int, rank: int) -> int:
    """Seed python, numpy and torch (all devices) of this rank from ``(seed, step, rank)`` (a
    blake2b digest): used instead of the checkpoint's per-rank RNG states when the layout changed,
    since rank ``r`` of the new layout has no predecessor. Returns the seed."""
    digest = hashlib.blake2b(f"llp-pretrain/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    s = int.from_bytes(digest, "little") & (2 ** 63 - 1)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
    return s


def describe_rng(meta: Optional[Dict[str, Any]], d) -> Optional[str]:
    """A log line when the per-rank RNG states are derived instead of restored (another layout)."""
    old = (meta or {}).get("layout", {})
    if not old or (old.get("data_parallel_size"), old.get("sequence_parallel_size")) == (d.dp_size, d.sp_size):
        return None
    return ("[llp-pretrain] the layout changed (dp {} x sp {} -> dp {} x sp {}): dropout RNG states are derived from "
            "(train.seed, step, rank), not restored, so dropout masks differ from an uninterrupted run".format(
                old.get("data_parallel_size"), old.get("sequence_parallel_size"), d.dp_size, d.sp_size))
