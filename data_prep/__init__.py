"""Data preparation: corpora -> SentencePiece tokenizer -> tokenized WebDataset shards.

Python API (the ``llp-prep`` CLI is a thin layer over it; see ``docs/data_prep.md``):

- ``train_tokenizer(inputs, out_dir, vocab_size=..., ...)`` -> tokenizer.json dict
- ``build_shards(inputs, tokenizer, out_dir, seq_len=..., ...)`` -> manifest dict (with
  ``num_tasks``/``task_index``: one task of an array job, -> part manifest)
- ``merge_parts(out_dir)`` -> the manifest of the merged array job
- ``verify_dataset(dir)`` -> ``{"ok", "errors", ...}``
- ``dataset_stats(dir)`` -> per-split statistics
- ``ReadOptions``: how documents are read (``doc_sep``, ``text_key``, ``errors``, ``strict``,
  ``input_format``: text, JSON Lines or Parquet)
- ``DataPrepError``: user-facing errors; ``BUNDLED_CORPUS``: path of the bundled KJV corpus
"""
from pathlib import Path

from .array import merge_parts
from .errors import DataPrepError
from .inputs import ReadOptions
from .manifest import read_manifest
from .shards import build_shards
from .stats import dataset_stats
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, load_tokenizer, train_tokenizer
from .verify import verify_dataset

BUNDLED_CORPUS = Path(__file__).resolve().parent / "data" / "kjv.txt.gz"

__all__ = ["train_tokenizer", "build_shards", "merge_parts", "verify_dataset", "dataset_stats", "ReadOptions",
           "DataPrepError", "read_manifest", "load_tokenizer", "BUNDLED_CORPUS",
           "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]
