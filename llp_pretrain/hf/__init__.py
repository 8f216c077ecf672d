"""Hugging Face integration: ``transformers`` export (``export.py``) and lm-evaluation-harness
runs (``harness.py``). Needs the ``eval`` extra (``pip install -e .[eval]``); see
``docs/huggingface.md``."""
