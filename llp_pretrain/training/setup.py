"""Set-up of a training run: the run directory's files, the model and the DeepSpeed engine.

Order matters for exact resume: the model is built under ``train.seed`` (same weights on every
rank), then each rank reseeds with ``seed + rank`` (dropout differs across ranks); DeepSpeed's
initialisation draws from these generators too, and the checkpoint's RNG states are restored only
after everything else is built (``Trainer``).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from llp_pretrain import checkpoint as ckpt
from llp_pretrain.config import RunConfig, dump_yaml
from llp_pretrain.run_identity import clear_run, hold_run_lock

from .checkpointer import StartPoint
from .loss import SequenceParallelContext, build_parallel_context
from .optim import make_optimizer, make_scheduler

__all__ = ["hold_run_dir", "prepare_run_dir", "Built", "build_engine"]


def hold_run_dir(run_dir: Path, d) -> None:
    """Rank 0 takes the run directory's lock (:func:`~llp_pretrain.run_identity.hold_run_lock`); every
    rank learns the outcome (one all-reduce), so a refusal ends all ranks, none waits at a barrier.
    Raises ``ValueError``."""
    from .distributed import all_reduce

    err = ""
    if d.rank == 0:
        try:
            hold_run_lock(run_dir)
        except ValueError as e:
            err = str(e)
    refused, = all_reduce([1.0 if err else 0.0], op="max", device=d.reduce_device)
    if refused:
        raise ValueError(err or f"{run_dir} is in use by another training process (see rank 0's message)")


def prepare_run_dir(cfg: RunConfig, d, overwrite: bool, resolved: Dict[str, Any], hashes: Dict[str, Optional[str]],
                    tokenizer_path: Optional[str]) -> None:
    """Rank 0 takes the run directory's lock (:func:`hold_run_dir`), then: clear the run
    (``--overwrite``), create ``checkpoints/``, write ``config.resolved.yaml``,
    ``ds_config.json``, ``hashes.json`` and a copy of the tokenizer (temp name, then rename). All ranks
    wait for the directory (a barrier)."""
    import torch.distributed as dist

    run_dir = Path(cfg.run.output_dir)
    hold_run_dir(run_dir, d)
    if d.rank == 0:
        if overwrite:
            clear_run(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if d.rank != 0:
        return
    if tokenizer_path is None:
        print(f"[llp-pretrain] warning: no tokenizer.model matching {cfg.data.first_path}/manifest.json found next to "
              f"the shards or where the manifest says; text samples are shown as ids and the run directory gets "
              f"no tokenizer (set data.tokenizer=PATH)", flush=True)
    dump_yaml(resolved, run_dir / "config.resolved.yaml")
    ckpt.write_json_atomic(run_dir / "ds_config.json", cfg.ds_config)
    ckpt.write_json_atomic(run_dir / "hashes.json", hashes)
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, run_dir / ".tokenizer.model.tmp")
        os.replace(run_dir / ".tokenizer.model.tmp", run_dir / "tokenizer.model")


@dataclass
class Built:
    """What :func:`build_engine` returns: the DeepSpeed ``engine``, the sequence-parallel context
    ``sp``, the model's ``n_params`` and ``flops_per_token`` (at ``seq_len``), and the ZeRO ``stage``."""

    engine: Any
    sp: SequenceParallelContext
    n_params: int
    flops_per_token: float
    stage: int


def build_engine(cfg: RunConfig, d, start: StartPoint) -> Built:
    """Build the model (``train.seed``; ``train.init_from`` weights on a fresh start), the optimizer,
    the LR scheduler (``start.lr_fn``) and ``deepspeed.initialize`` with the resolved DeepSpeed JSON
    and the sequence-parallel ``mpu``; with ``train.compile`` the engine's module runs under
    ``torch.compile`` (``engine.compile()``). Collective: every rank calls it.

    Raises ``ValueError`` naming mismatched tensors when ``train.init_from`` does not fit the model."""
    import deepspeed

    from llp_pretrain.models import build_model

    t = cfg.train
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2 ** 32)
    model = build_model(cfg.model)
    init_from = getattr(t, "init_from", None)
    if init_from and start.where is None:
        from llp_pretrain.export import load_exported_weights

        load_exported_weights(model, init_from)  # ValueError naming mismatched tensors
    torch.manual_seed(t.seed + d.rank)  # dropout differs across ranks; restored exactly on resume

    n_params = model.num_params()
    flops_tok = model.flops_per_token(cfg.model.seq_len)
    sp = build_parallel_context(cfg, d)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, start.lr_fn, t.lr)
    model = sp.prepare_model(model, cfg.ds_config)
    ds_config = cfg.ds_config
    if start.universal:  # another world size: load the converted copy (training/universal.py)
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=sp.mpu, dist_init_required=False)
    if t.compile:  # torch.compile through DeepSpeed's public API; activation checkpoints are non-reentrant
        engine.compile()
    stage = int(cfg.ds_config.get("zero_optimization", {}).get("stage", 0))
    return Built(engine, sp, n_params, flops_tok, stage)
