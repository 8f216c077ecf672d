"""The training engine as named components (``docs/internals.md``, Training package):

=================  ==============================================================================
``trainer``        :class:`Trainer` (set-up in ``__init__``, the loop in ``train``), :func:`train`
``distributed``    process group set-up/tear-down, :class:`DistInfo`, the small all-reduce
``setup``          run directory files, model, optimizer, DeepSpeed engine
``step``           one optimizer step over its micro-batches (:func:`train_step`)
``loss``           loss of a micro-batch; the sequence-parallel plug point
``optim``          AdamW, LR scheduler, skipping a non-finite step
``checkpointer``   start point and resume checks, save, load
``evaluation``     validation during training, text samples
``stop``           signals and time limit, agreed by all ranks
``metrics``        windowed training metrics, MFU, console/TensorBoard lines
``callbacks``      hooks run outside the loop (e.g. the test suite's pause)
=================  ==============================================================================
"""
from .distributed import DistInfo, DistributedInitError, setup_distributed
from .loss import SequenceParallelContext, build_parallel_context, compute_loss
from .trainer import Trainer, TrainResult, train

__all__ = ["Trainer", "TrainResult", "train", "DistInfo", "DistributedInitError", "setup_distributed",
           "SequenceParallelContext", "build_parallel_context", "compute_loss"]
