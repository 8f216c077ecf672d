"""Hugging Face integration: ``transformers`` export (``export.py``) and lm-evaluation-harness
runs (``harness.py``). Needs the ``eval`` extra (``pip install -e .[eval]``); see
``docs/huggingface.md``."""


def require_eval_extra(what: str) -> None:
    """Raise ``ValueError`` (one line, with the install command) unless the ``eval`` extra's
    packages needed by ``what`` import."""
    import importlib.util

    need = ["transformers", "tokenizers", "huggingface_hub"] + (["lm_eval"] if what == "harness" else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)}: pip install -e \".[eval]\" (or \"llp-pretrain[eval]\")")
