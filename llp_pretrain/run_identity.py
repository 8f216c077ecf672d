"""Run identity: what a run directory holds, and whether a checkpoint may continue under a config.

Checked before anything is built or written, so a refused start leaves the run directory as it was:

* :func:`start_point`: a run directory that already holds checkpoints is never silently restarted;
  it needs ``--resume auto|PATH`` (continue) or ``--overwrite`` (start afresh).
* :func:`check_resume_identity`: a checkpoint continues only with the same model config and
  tokenizer; another dataset only with ``train.allow_data_change`` (then it is read from its start).

Every refusal is a ``ValueError`` whose one-line message says what differs and what to do.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from llp_pretrain import checkpoint as ckpt

__all__ = ["run_hashes", "start_point", "clear_run", "check_resume_identity", "hold_run_lock",
           "RUNTIME_MODEL_FIELDS"]

LOCK = ".llp-train.lock"
_held: Dict[str, int] = {}  # run dir -> open file descriptor holding its lock (for the process' life)

#: model fields that change how a step is computed, not what is computed: free to change on resume
RUNTIME_MODEL_FIELDS = ("checkpoint_activations",)


def run_hashes(cfg, tokenizer_path: Optional[Path]) -> Dict[str, Optional[str]]:
    """sha256 of the dataset's ``manifest.json`` (for ``data.sources``: of the sources' names, weights
    and manifest hashes), of the tokenizer file found for it, and the tokenizer
    hash the manifest records (None where unknown)."""
    from data_prep.tokenizer import file_sha256
    from llp_pretrain.remote import is_url, url_sha256

    def sha_of(path: str) -> Optional[str]:
        if is_url(path):
            return url_sha256(path)
        f = Path(path) / "manifest.json"
        return file_sha256(f) if f.is_file() else None

    if cfg.data.sources:  # a mixture: its sources' names, weights and manifests (the order depends on all)
        listing = "".join(f"{s.name}\t{s.weight!r}\t{sha_of(s.path)}\n" for s in cfg.data.sources)
        manifest_sha = hashlib.sha256(listing.encode()).hexdigest()
    else:
        manifest_sha = sha_of(cfg.data.path)
    return {"manifest_sha256": manifest_sha,
            "tokenizer_sha256": file_sha256(tokenizer_path) if tokenizer_path and Path(tokenizer_path).is_file()
            else None,
            "tokenizer_manifest_sha256": (cfg.manifest or {}).get("tokenizer", {}).get("sha256")}


def start_point(run_dir: Path, resume: Optional[str], overwrite: bool) -> Optional[Tuple[Path, str]]:
    """``(checkpoints dir, tag)`` to resume from, or None for a fresh start.

    Raises ``ValueError`` when ``run_dir`` already holds checkpoints and neither ``resume`` nor
    ``overwrite`` is given or when both are given; ``FileNotFoundError``
    for an explicit resume path without a complete checkpoint."""
    run_dir = Path(run_dir)  # (an output_dir that is a file is refused by the config loader)
    if resume is not None and overwrite:
        raise ValueError(f"--resume {resume} and --overwrite contradict each other: continue the run in {run_dir} "
                         "with --resume, or start it afresh with --overwrite")
    ckpt_dir = run_dir / "checkpoints"
    if resume is None and not overwrite and ckpt.complete_tags(ckpt_dir):
        newest = ckpt.complete_tags(ckpt_dir)[-1]
        raise ValueError(f"{run_dir} already holds checkpoints (newest {newest}): continue it with --resume auto, "
                         "start it afresh with --overwrite (deletes its checkpoints and TensorBoard events), or "
                         "set run.output_dir to a new directory")
    return ckpt.resolve_resume(resume, ckpt_dir)


def hold_run_lock(run_dir: Path) -> None:
    """Take ``run_dir/.llp-train.lock`` (a POSIX record lock, ``lockf``, exclusive) for the life of
    this process, so two trainings never write one run directory; a second call for the same
    directory in the same process is a no-op. The operating system releases it when the process
    ends, however it ends. A record lock belongs to the process, not to the open file, so forked
    children (data-loader workers, which outlive a SIGKILLed parent by a few seconds) never hold it.

    Raises ``ValueError`` naming the directory and the holder's pid when another process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"{run_dir} is in use by another training process (pid {holder}); wait for it to finish, "
                         "stop it, or set run.output_dir to another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def clear_run(run_dir: Path) -> None:
    """``--overwrite``: delete ``run_dir/checkpoints`` and ``run_dir/tensorboard`` (nothing else)."""
    for sub in ("checkpoints", "tensorboard"):
        shutil.rmtree(Path(run_dir) / sub, ignore_errors=True)


def _model_diffs(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    keys = (set(old) | set(new)) - set(RUNTIME_MODEL_FIELDS)
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def check_resume_identity(meta: Dict[str, Any], model_cfg: Dict[str, Any], hashes: Dict[str, Optional[str]],
                          allow_data_change: bool, where: str) -> int:
    """Compare a checkpoint's ``run_meta.json`` with this run; return the optimizer step at which the
    current dataset started (the loader reads it from its beginning at that step).

    Raises ``ValueError`` when the model config differs (except :data:`RUNTIME_MODEL_FIELDS`), when the
    tokenizer differs, or when the dataset differs and ``allow_data_change`` is false."""
    diffs = _model_diffs(meta.get("model") or {}, model_cfg)
    if diffs:
        shown = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in list(diffs.items())[:6])
        raise ValueError(f"{where} was trained with another model config ({shown}); resume with the checkpoint's "
                         "model section (see its config.resolved.yaml), or start a new run with train.init_from")
    old = meta.get("hashes") or {}
    for key in ("tokenizer_manifest_sha256", "tokenizer_sha256"):
        if old.get(key) and hashes.get(key) and old[key] != hashes[key]:
            raise ValueError(f"{where} was trained with tokenizer sha256 {old[key][:12]}..., this run's data uses "
                             f"{hashes[key][:12]}...: token ids would change meaning. Resume on data tokenized with "
                             "the checkpoint's tokenizer, or start a new run")
    start = int(meta.get("data_start_step", 0))
    if old.get("manifest_sha256") and hashes.get("manifest_sha256") and old["manifest_sha256"] != hashes["manifest_sha256"]:
        if not allow_data_change:
            raise ValueError(f"{where} was trained on another dataset (manifest sha256 {old['manifest_sha256'][:12]}..., "
                             f"this run's {hashes['manifest_sha256'][:12]}...): resume with the checkpoint's data.path, "
                             "or pass --set train.allow_data_change=true to continue on the new data from its beginning")
        if os.environ.get("RANK", "0") == "0":
            print(f"[llp-pretrain] data changed at step {meta['step']}: manifest sha256 {old['manifest_sha256'][:12]}... -> "
                  f"{hashes['manifest_sha256'][:12]}...; the new dataset is read from its beginning", flush=True)
        start = int(meta["step"])
    return start
