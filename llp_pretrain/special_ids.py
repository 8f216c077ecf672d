"""The tokenizer's special ids for generation, read from the SentencePiece model or the manifest.

Nothing downstream of ``llp-prep`` assumes ids 0-3: ``llp-prep shard`` records the model's own
``pad_id``, ``unk_id``, ``bos_id`` and ``eos_id`` in ``manifest.json`` (``-1``: not defined;
``docs/internals.md``), and a Llama-2 style model has unk 0, bos 1, eos 2 and no pad.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

__all__ = ["generation_ids", "fallback_prompt"]


def _ids(sp=None, manifest: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    if sp is not None:
        return {"pad_id": int(sp.pad_id()), "unk_id": int(sp.unk_id()), "bos_id": int(sp.bos_id()),
                "eos_id": int(sp.eos_id())}
    tok = (manifest or {}).get("tokenizer")
    tok = tok if isinstance(tok, dict) else {}
    return {k: int(tok[k]) for k in ("pad_id", "unk_id", "bos_id", "eos_id") if isinstance(tok.get(k), int)}


def generation_ids(sp=None, manifest: Optional[Dict[str, Any]] = None) -> Tuple[Optional[int], int]:
    """``(eos_id, pad_id)`` for ``LMModel.generate``: the EOS that ends a generation (None when the
    tokenizer defines none) and the id that left-pads a short window (the tokenizer's pad; the EOS,
    a document boundary, when it has no pad; 0 when neither is known). From the SentencePiece
    processor ``sp`` when given, else from the manifest's ``tokenizer`` section."""
    ids = _ids(sp, manifest)
    eos = ids.get("eos_id", -1)
    pad = ids.get("pad_id", -1)
    eos_out = eos if eos >= 0 else None
    return eos_out, pad if pad >= 0 else eos if eos >= 0 else 0


def fallback_prompt(manifest: Optional[Dict[str, Any]] = None) -> List[int]:
    """A one-token prompt when no tokenizer is at hand: the EOS id (the stream's document boundary,
    so the model continues with the start of a document), else the BOS id, else 0."""
    ids = _ids(None, manifest)
    for k in ("eos_id", "bos_id"):
        if ids.get(k, -1) >= 0:
            return [ids[k]]
    return [0]
