"""Tokenizer + shards for a run in one call (used by ``quickstart`` and ``compare``).

Wraps :mod:`data_prep` (``train_tokenizer``, ``build_shards``) with reuse: an existing tokenizer is
kept, and shards are rebuilt only when ``OUT/shards/manifest.json`` is missing or was made for
another ``seq_len`` or another tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

__all__ = ["prepare_dataset"]


def prepare_dataset(out: Path, seq_len: int, *, corpus: Optional[Sequence[str]] = None, vocab_size: int = 2000,
                    model_type: str = "bpe", doc_sep: str = "blank-line", val_fraction: float = 0.02,
                    samples_per_shard: int = 1000, max_sentences: int = 1_000_000,
                    log: Callable[[str], None] = lambda msg: print(msg, flush=True),
                    progress: bool = False) -> Dict[str, Path]:
    """Build (or reuse) ``out/tokenizer/tokenizer.model`` and ``out/shards/`` for ``seq_len``.

    Args:
        out: directory for ``tokenizer/`` and ``shards/``.
        seq_len: model context in tokens (samples hold ``seq_len + 1`` tokens).
        corpus: files or directories; default the bundled King James Bible.
        vocab_size, model_type: SentencePiece settings (pieces, ``bpe``/``unigram``).
        doc_sep: ``blank-line`` (paragraphs/chapters as documents) or ``file``.
        val_fraction: expected fraction of documents held out as ``val``.
        progress: show ``data_prep``'s progress bars (stderr) while training the tokenizer and sharding.

    Returns:
        ``{"tokenizer": path of tokenizer.model, "shards": shard directory}``.

    Raises:
        data_prep.DataPrepError: unreadable corpus or settings it cannot support.
    """
    from data_prep import BUNDLED_CORPUS, ReadOptions, build_shards, train_tokenizer

    inputs = [str(c) for c in (corpus or [BUNDLED_CORPUS])]
    tok_dir, shard_dir = Path(out) / "tokenizer", Path(out) / "shards"
    opts = ReadOptions(doc_sep=doc_sep)
    model = tok_dir / "tokenizer.model"
    if not model.is_file():
        log(f"training a {vocab_size}-piece SentencePiece {model_type} tokenizer on {', '.join(inputs)}")
        train_tokenizer(inputs, str(tok_dir), vocab_size=vocab_size, model_type=model_type,
                        max_sentences=max_sentences, read_options=opts, quiet=not progress)
    else:
        log(f"tokenizer exists: {model}")
    sha = json.loads((tok_dir / "tokenizer.json").read_text())["sha256"]
    manifest = shard_dir / "manifest.json"
    ok = False
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        ok = m.get("seq_len") == seq_len and m.get("tokenizer", {}).get("sha256") == sha
    if ok:
        log(f"shards exist: {shard_dir}")
    else:
        log(f"sharding at seq_len {seq_len} into {shard_dir}")
        build_shards(inputs, str(model), str(shard_dir), seq_len=seq_len, val_fraction=val_fraction,
                     samples_per_shard=samples_per_shard, read_options=opts, workers=1, overwrite=True,
                     quiet=not progress)
    return {"tokenizer": model, "shards": shard_dir}
