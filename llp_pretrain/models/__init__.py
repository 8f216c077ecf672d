"""The model family: LLP, PerceiverAR and its three enhancements, and a dense GPT baseline.

Public API (contract in ``docs/internals.md``, math in ``docs/models.md``):
``ModelConfig``, ``build_model``, ``LMModel``, ``lm_loss``, ``from_reference_state_dict``,
``reference_config``, ``flops_per_token``, ``VARIANTS``, ``LATENT_VARIANTS``.
"""
from .config import LATENT_VARIANTS, VARIANTS, ModelConfig
from .flops import flops_per_token
from .loss import lm_loss
from .model import LMModel, build_model
from .reference import from_reference_state_dict, reference_config

__all__ = [
    "ModelConfig",
    "build_model",
    "LMModel",
    "lm_loss",
    "from_reference_state_dict",
    "reference_config",
    "flops_per_token",
    "VARIANTS",
    "LATENT_VARIANTS",
]
