# Part of llp-pretrain's Hugging Face export (llp_pretrain/hf/remote/); copied verbatim by
# `llp-pretrain export --format hf`. Do not edit an exported copy: re-export instead.
"""``transformers`` configuration of an llp-pretrain model.

Every field of the project's ``ModelConfig`` (``llp_models_config.py``, generated from
``llp_pretrain/models/config.py``) is a top-level attribute of this config, so ``config.json``
holds them all; ``model_config()`` validates them with that same ``ModelConfig``.
"""
from transformers import PreTrainedConfig

from .llp_models_config import ModelConfig

#: variants this export supports (the PerceiverAR family predicts only its latent positions)
SUPPORTED_VARIANTS = ("gpt", "llp")


class LLPPretrainConfig(PreTrainedConfig):
    """Config of ``LLPPretrainForCausalLM``; the ``ModelConfig`` fields plus transformers' own.

    ``max_position_embeddings`` (an alias of ``seq_len``) is the trained window, which is what
    tools such as lm-evaluation-harness use as the model's maximum length.
    """

    model_type = "llp_pretrain"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "seq_len",
    }

    def __init__(self, **kwargs):
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in ModelConfig.model_fields}
        fields.setdefault("variant", "llp")
        for k, v in fields.items():
            setattr(self, k, v)
        kwargs.setdefault("tie_word_embeddings", bool(fields.get("tie_embeddings", False)))
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The validated ``ModelConfig`` (activation checkpointing off). Raises ``ValueError`` for
        a variant this export does not support and pydantic's ``ValidationError`` for bad fields."""
        fields = {k: getattr(self, k) for k in ModelConfig.model_fields if hasattr(self, k)}
        fields["checkpoint_activations"] = False
        cfg = ModelConfig(**fields)
        if cfg.variant not in SUPPORTED_VARIANTS:
            raise ValueError(f"variant {cfg.variant!r} is not supported by the transformers export "
                             f"(supported: {', '.join(SUPPORTED_VARIANTS)})")
        return cfg
