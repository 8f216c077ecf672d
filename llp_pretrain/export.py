"""Consolidate a DeepSpeed checkpoint (ZeRO 0-3) into ``model.safetensors`` + ``model_config.json``.

``export_checkpoint(CHECKPOINT, OUT)`` accepts a run directory, its ``checkpoints/`` directory (the
``latest`` tag is used) or one ``stepNNNNNNNN`` tag directory. ZeRO-0 weights come from the
``module`` entry of ``mp_rank_00_model_states.pt``; ZeRO 1-3 weights are the fp32 master weights
reassembled from every rank's partition by DeepSpeed's ``zero_to_fp32`` utilities. Every file is
read with torch's weights-only unpickler (``checkpoint.weights_only_loads``): a planted pickle is
refused with :class:`~llp_pretrain.checkpoint.UntrustedCheckpointError`, never run. Every tensor is
checked against the shape of a freshly built model of the checkpoint's ``ModelConfig`` before
anything is written; files are written under temporary names and renamed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch

from llp_pretrain import checkpoint as ckpt

__all__ = ["resolve_checkpoint", "load_checkpoint_weights", "export_checkpoint", "load_exported_weights",
           "load_model", "find_tokenizer", "tokenizer_hashes"]

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
HASHES = "hashes.json"  # tokenizer/dataset sha256 of the run, next to exported weights


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete tag directory that ``path`` designates (run dir, checkpoints dir or tag dir).

    Raises ``FileNotFoundError`` naming ``path`` otherwise."""
    p = Path(path)
    if (p / ckpt.META).is_file():
        return p
    for cand in (p / "checkpoints", p):
        tag = ckpt.newest_tag(cand) if cand.is_dir() else None
        if tag:
            return cand / tag
    raise FileNotFoundError(f"{path}: no complete llp-pretrain checkpoint (run dir, checkpoints/ dir with 'latest', "
                            f"or stepNNNNNNNN dir with {ckpt.META})")


def load_checkpoint_weights(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict, Path]:
    """``(state_dict, model_config_dict, tag_dir)`` of a checkpoint, full fp32 tensors on CPU.

    Raises ``FileNotFoundError`` for a missing/incomplete checkpoint and ``ValueError`` when a tensor
    is missing, unexpected or has the wrong shape for the checkpoint's model config."""
    tag_dir = resolve_checkpoint(path)
    meta = ckpt.read_meta(tag_dir)
    stage = int(meta.get("zero_stage", 0))
    if stage == 0:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{tag_dir}: no mp_rank_00_model_states.pt")
        state = ckpt.safe_torch_load(files[0])["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt.check_loadable(tag_dir)
        with ckpt.weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    model_cfg = meta["model"]
    _check_shapes(state, model_cfg, tag_dir)
    return state, model_cfg, tag_dir


def _shape_problems(state: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> str:
    """'' when ``state`` has exactly ``ref``'s tensor names and shapes, else a one-line summary."""
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}" for k in ref if k in state
           and tuple(state[k].shape) != tuple(ref[k].shape)]
    parts = [f"{label} {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
             for label, items in (("missing", missing), ("unexpected", extra), ("wrong shapes", bad)) if items]
    return "; ".join(parts)


def _check_shapes(state: Dict[str, torch.Tensor], model_cfg: Dict, where) -> None:
    from pydantic import ValidationError

    from llp_pretrain.models import build_model

    try:
        with torch.device("meta"):
            ref = build_model(model_cfg).state_dict()
    except (ValidationError, TypeError) as e:
        first = [f"{'.'.join(map(str, x['loc'])) or 'model'}: {x['msg']}" for x in e.errors()][:3] \
            if isinstance(e, ValidationError) else [str(e)]
        raise ValueError(f"{where}: the recorded model config is invalid ({'; '.join(first)}); this checkpoint is "
                         "damaged, use another one") from None
    problems = _shape_problems(state, ref)
    if problems:
        raise ValueError(f"{where}: weights do not match the model config: {problems}")


def find_tokenizer(tag_dir: Path):
    """``tokenizer.model`` saved in the run directory of a checkpoint (or next to exported weights)."""
    for cand in (tag_dir / "tokenizer.model", tag_dir.parent / "tokenizer.model", tag_dir.parent.parent / "tokenizer.model"):
        if cand.is_file():
            return cand
    return None


def tokenizer_hashes(path: str | os.PathLike) -> set:
    """sha256 digests of the ``tokenizer.model`` a checkpoint or exported directory was trained with:
    from ``run_meta.json`` ``hashes`` (checkpoints), ``hashes.json`` (exports) or, for an export
    without one, its ``tokenizer.model``. Empty when none is recorded."""
    p = Path(path)
    exported = (p / WEIGHTS).is_file() and (p / MODEL_CONFIG).is_file()
    if exported:
        rec = json.loads((p / HASHES).read_text()) if (p / HASHES).is_file() else {}
    else:
        rec = ckpt.read_meta(resolve_checkpoint(p)).get("hashes") or {}
    out = {v for k, v in rec.items() if k in ("tokenizer_sha256", "tokenizer_manifest_sha256") and isinstance(v, str)}
    if not out and exported and (p / "tokenizer.model").is_file():
        from data_prep.tokenizer import file_sha256

        out = {file_sha256(p / "tokenizer.model")}
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``OUT/model.safetensors`` (fp32, every tensor full-shape), ``OUT/model_config.json``,
    ``OUT/hashes.json`` (the tokenizer/dataset sha256 the run recorded) and, when the run has one,
    ``OUT/tokenizer.model``, with the usual permissions (``0666 & ~umask``). Returns ``OUT``.

    All files are written into a temporary directory inside ``OUT`` and renamed into place only
    when every one is complete (``model_config.json`` last), so a failure (a full disk) leaves no
    half-written export and an earlier export in ``OUT`` as it was; an ``OUT`` this call created is
    removed again.

    Raises ``FileExistsError`` when ``OUT`` is an existing file, lies under one or is not writable
    (before any work); ``OSError(ENOSPC)`` with a one-line message on a full disk."""
    from llp_pretrain.config import output_dir_problem

    out = Path(out)
    why = output_dir_problem(out)  # checked before the (possibly long) consolidation
    if why:
        raise FileExistsError(f"export OUT: {why}")
    state, model_cfg, tag_dir = load_checkpoint_weights(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    hashes = ckpt.read_meta(tag_dir).get("hashes") or {}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = None
    try:
        from data_prep.tokenizer import remove_stale_temps

        remove_stale_temps(out, ".export-tmp-")   # what a killed export left
        stage = Path(tempfile.mkdtemp(prefix=f".export-tmp-{os.getpid()}-", dir=out))
        names = _write_export(stage, out, tensors, model_cfg, hashes, find_tokenizer(tag_dir), tag_dir)
        for name in names:  # renames need no space; model_config.json (what readers look for) last
            os.replace(stage / name, out / name)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    stage.rmdir()
    return out


def _write_export(stage: Path, out: Path, tensors: Dict[str, torch.Tensor], model_cfg: Dict, hashes: Dict,
                  tok, tag_dir: Path) -> list:
    """Write the export's files into ``stage``; returns their names in rename order. A full disk
    becomes one ``OSError(ENOSPC)`` naming ``out`` and the file."""
    from safetensors.torch import save_file

    name = WEIGHTS
    try:
        save_file(tensors, str(stage / WEIGHTS), metadata={"source": str(tag_dir), "format": "pt"})
        os.chmod(stage / WEIGHTS, 0o666 & ~_umask())  # safetensors creates its file 0600
        names = [WEIGHTS, HASHES]
        name = HASHES
        ckpt.write_json_atomic(stage / HASHES, {k: v for k, v in hashes.items() if isinstance(v, str)})
        if tok is not None:
            name = "tokenizer.model"
            shutil.copyfile(tok, stage / name)
            names.append(name)
        name = MODEL_CONFIG
        ckpt.write_json_atomic(stage / MODEL_CONFIG, model_cfg)
    except Exception as e:
        full = disk_full_error(e, out, name)
        if full is not None:
            raise full from None
        raise
    return names + [MODEL_CONFIG]


def disk_full_error(e: BaseException, out: Path, name: str):
    """The one-line ``OSError(ENOSPC)`` for an export into ``out`` that ran out of space while writing
    ``name`` (``e``: an ``OSError`` ENOSPC/EDQUOT, or safetensors' own error for it); None for any
    other error."""
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left" in str(e) or "os error 28" in str(e)
    if not full:
        return None
    return OSError(errno.ENOSPC, f"no space left on the device holding {out} while writing {name}; free space or "
                                 f"choose another OUT, then rerun the export (nothing was written to {out})")


def load_exported_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load ``PATH/model.safetensors`` into ``model`` (strict).

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` naming the tensors whose
    names or shapes do not fit ``model``."""
    from safetensors.torch import load_file

    f = Path(path) / WEIGHTS
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not found; create it with `llp-pretrain export CHECKPOINT {path}`")
    try:
        state = load_file(str(f))
    except Exception as e:  # not a safetensors file (e.g. a pickle renamed): never unpickled, refused
        raise ValueError(f"{f}: not a valid safetensors file ({type(e).__name__}: {str(e)[:80]}); re-export it with "
                         "`llp-pretrain export`") from None
    problems = _shape_problems(state, model.state_dict())
    if problems:
        raise ValueError(f"{f} does not fit this model config: {problems}; use weights exported from a run with "
                         f"the same model section (see {Path(path) / MODEL_CONFIG})")
    model.load_state_dict(state, strict=True)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A model ready for eval/generation from an exported directory or any checkpoint path.

    Returns ``(model, model_config_dict, tokenizer_path_or_None)``; the model is in eval mode."""
    from llp_pretrain.models import build_model

    p = Path(path)
    if (p / WEIGHTS).is_file() and (p / MODEL_CONFIG).is_file():
        try:
            cfg = json.loads((p / MODEL_CONFIG).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p / MODEL_CONFIG}: not valid JSON ({e}); re-export it with `llp-pretrain export`") from None
        model = build_model(cfg)
        load_exported_weights(model, p)
        tok = p / "tokenizer.model" if (p / "tokenizer.model").is_file() else None
    else:
        state, cfg, tag_dir = load_checkpoint_weights(p)
        model = build_model(cfg)
        model.load_state_dict(state, strict=True)
        tok = find_tokenizer(tag_dir)
    return model.to(device).eval(), cfg, tok
