"""The training engine's public names, kept importable from their historical place.

The engine lives in the package :mod:`llp_pretrain.training` (one module per component; see
``docs/internals.md``). ``train(cfg, resume)`` runs one training job described by a validated
:class:`~llp_pretrain.config.RunConfig`.
"""
from __future__ import annotations

from data_prep.tokenizer import file_sha256
from llp_pretrain.schedule import lr_at
from llp_pretrain.training.checkpointer import check_resume_layout, layout_meta as _layout_meta
from llp_pretrain.training.distributed import (DIST_INIT_TIMEOUT_S, DistInfo, DistributedInitError,
                                               free_port as _free_port, setup_distributed)
from llp_pretrain.training.loss import SequenceParallelContext, build_parallel_context, compute_loss
from llp_pretrain.training.optim import SkippableAdamW as _AdamW, make_optimizer as _make_optimizer
from llp_pretrain.training.trainer import TrainResult, Trainer, train

__all__ = ["DistInfo", "DistributedInitError", "DIST_INIT_TIMEOUT_S", "setup_distributed", "lr_at", "compute_loss",
           "SequenceParallelContext", "build_parallel_context", "check_resume_layout", "train", "Trainer",
           "TrainResult", "file_sha256", "_make_optimizer", "_AdamW", "_layout_meta", "_free_port"]
