"""``llp-pretrain export CHECKPOINT OUT --format hf``: a directory ``transformers`` loads.

``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(OUT)`` read it. Contents: ``config.json`` (``model_type``,
``auto_map``, every ``ModelConfig`` field), ``model.safetensors`` (fp32; above ``max_shard_size``
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, split by
``huggingface_hub.split_torch_state_dict_into_shards`` as ``transformers`` does), the modeling code
generated from ``llp_pretrain/models`` (``bundle.py``), the tokenizer (``tokenizer.py``) and a
``README.md`` model card (``card.py``). Works from any checkpoint ``load_checkpoint_weights`` reads
(ZeRO 0-3, sequence-parallel runs: weights are whole on every rank there). Everything is written
into a temporary sibling directory that is renamed to ``OUT`` at the end, so ``OUT`` is complete
or absent.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from llp_pretrain import checkpoint as ckpt

SUPPORTED = ("gpt", "llp")
MODEL_TYPE = "llp_pretrain"
AUTO_MAP = {"AutoConfig": "configuration_llp_pretrain.LLPPretrainConfig",
            "AutoModelForCausalLM": "modeling_llp_pretrain.LLPPretrainForCausalLM"}
DEFAULT_MAX_SHARD = "5GB"


def check_variant(variant: str) -> None:
    """Raise ``ValueError`` for variants the transformers export cannot express."""
    if variant not in SUPPORTED:
        raise ValueError(f"--format hf supports variants {', '.join(SUPPORTED)}, not {variant!r}: the PerceiverAR "
                         "family predicts only its latent positions, while transformers' causal-LM API (and "
                         "lm-evaluation-harness) needs a logit at every position; use --format safetensors")


def hf_config(model_cfg: Dict, special_ids: Optional[Dict[str, int]]) -> Dict:
    """``config.json`` contents for ``model_cfg`` (the checkpoint's resolved ``ModelConfig`` dict)."""
    from llp_pretrain.hf.bundle import sources_sha256

    cfg = {k: v for k, v in model_cfg.items() if k != "checkpoint_activations"}
    cfg.update({"model_type": MODEL_TYPE, "architectures": ["LLPPretrainForCausalLM"], "auto_map": AUTO_MAP,
                "tie_word_embeddings": bool(model_cfg.get("tie_embeddings", False)), "dtype": "float32",
                "use_cache": True, "llp_models_sha256": sources_sha256()})
    for k, v in (special_ids or {}).items():
        cfg[k] = v
    return cfg


def write_weights(state: Dict[str, torch.Tensor], out: Path, max_shard_size=DEFAULT_MAX_SHARD,
                  source: str = "") -> None:
    """``lm.``-prefixed fp32 tensors as one safetensors file or shards plus an index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    tensors = {f"lm.{k}": v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out / fname), metadata={"format": "pt", "source": source})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.numel() * t.element_size()
                                                                  for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _special_ids(tok_file: Optional[Path]) -> Dict[str, int]:
    if tok_file is None:
        return {}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_file))
    ids = {"pad_token_id": sp.pad_id(), "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def export_hf(path, out, max_shard_size=DEFAULT_MAX_SHARD) -> Path:
    """Export the checkpoint at ``path`` (run dir, checkpoints dir or tag dir) to ``out``.

    Raises ``FileNotFoundError`` (no checkpoint), ``ValueError`` (unsupported variant, weights that
    do not match the config, a tokenizer the export cannot reproduce, ``out`` exists and is not an
    earlier export). Returns ``out``."""
    from llp_pretrain.export import find_tokenizer, load_checkpoint_weights, resolve_checkpoint
    from llp_pretrain.hf import require_eval_extra
    from llp_pretrain.hf.bundle import bundle_sources
    from llp_pretrain.hf.card import model_card
    from llp_pretrain.hf.tokenizer import write_tokenizer
    from llp_pretrain.models import build_model

    require_eval_extra("export --format hf")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out}: exists and is not an exported directory; choose a new OUT")
    check_variant(ckpt.read_meta(resolve_checkpoint(path))["model"]["variant"])  # before loading weights
    state, model_cfg, tag_dir = load_checkpoint_weights(path)
    meta = ckpt.read_meta(tag_dir)
    tok = find_tokenizer(tag_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, text in bundle_sources().items():
            (tmp / name).write_text(text, encoding="utf-8")
        config = {**hf_config(model_cfg, _special_ids(tok)), "llp_step": int(meta.get("step", 0))}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {k: v for k, v in _special_ids(tok).items()}, indent=2, sort_keys=True) + "\n")
        write_weights(state, tmp, max_shard_size, source=str(tag_dir))
        if tok is not None:
            write_tokenizer(tok, tmp)
        with torch.device("meta"):
            n_params = build_model(model_cfg).num_params()
        (tmp / "README.md").write_text(model_card(model_cfg, meta, n_params, tag_dir.parent.parent, tok is not None))
        if out.exists():
            shutil.rmtree(out)  # an earlier export (checked above) or an empty directory
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        from llp_pretrain.export import disk_full_error

        full = disk_full_error(e, out, "the transformers files")
        if full is not None:
            raise full from None
        raise
    return out
