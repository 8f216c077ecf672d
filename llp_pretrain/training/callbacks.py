"""Callbacks: code that runs at fixed points of the training loop without living in it.

A callback is an object with any of ``on_train_start(trainer)`` (once, after the engine is built and
the checkpoint loaded, before the first step) and ``on_step_end(trainer)`` (after an optimizer step's
logging, evaluation and save, before the stop decision). Pass them to ``Trainer``/``train(callbacks=...)``,
or :func:`register` them for every run this process starts (how a harness that runs the CLI, e.g.
the test suite's, installs one).
"""
from __future__ import annotations

from typing import Any, List

__all__ = ["register", "registered", "clear"]

_REGISTERED: List[Any] = []


def register(callback: Any) -> None:
    """Install ``callback`` for every training run this process starts from now on."""
    _REGISTERED.append(callback)


def registered() -> List[Any]:
    """The callbacks installed with :func:`register` (a copy)."""
    return list(_REGISTERED)


def clear() -> None:
    """Remove every registered callback."""
    _REGISTERED.clear()
