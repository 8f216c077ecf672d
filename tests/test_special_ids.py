"""Special ids come from the tokenizer or the manifest, never fixed 0-3: a SentencePiece model trained
here with Llama-2's ids (unk 0, bos 1, eos 2, no pad) drives the training samples and generation."""
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch

from llp_pretrain.models import ModelConfig, build_model
from llp_pretrain.models.generation import window_logits
from llp_pretrain.special_ids import fallback_prompt, generation_ids
from llp_pretrain.training.evaluation import sample_text

LLAMA_IDS = {"pad_id": -1, "unk_id": 0, "bos_id": 1, "eos_id": 2}


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud"]
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(root / "m"), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    return root / "m.model"


def tiny_model(variant="llp", vocab=300):
    kw = dict(segment_len=4) if variant == "llp" else dict(latent_len=4, compression_len=5)
    torch.manual_seed(0)
    return build_model(ModelConfig(variant=variant, vocab_size=vocab, d_model=16, n_heads=2, n_layers=2, seq_len=16,
                                   **kw)).eval()


def test_ids_from_the_tokenizer_or_the_manifest(llama_style):
    sp = spm.SentencePieceProcessor(model_file=str(llama_style))
    assert generation_ids(sp) == (2, 2)  # no pad: short windows are padded with the EOS
    assert generation_ids(None, {"tokenizer": LLAMA_IDS}) == (2, 2)
    assert generation_ids(None, {"tokenizer": {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}}) == (3, 0)
    assert generation_ids(None, {"tokenizer": {"pad_id": 5, "eos_id": -1}}) == (None, 5)
    assert fallback_prompt({"tokenizer": LLAMA_IDS}) == [2]
    assert fallback_prompt({"tokenizer": {"pad_id": -1, "bos_id": 7, "eos_id": -1}}) == [7]


def test_window_left_padding_uses_the_given_pad_id():
    m = tiny_model("compressed_history")
    ids = torch.tensor([[9, 4, 11]])
    with torch.no_grad():
        want = m(torch.cat([torch.full((1, 13), 2), ids], dim=1))[:, -1]
        assert torch.allclose(window_logits(m, ids, pad_id=2), want)
        assert not torch.allclose(window_logits(m, ids, pad_id=0), want)


def _run_cfg(manifest, tokens=6):
    train = SimpleNamespace(sample_tokens=tokens, sample_prompt="alpha beta", seed=0)
    return SimpleNamespace(train=train, manifest=manifest)


def _eos_always(model, eos):
    """Make ``eos`` the model's certain next token (a forward hook on the real LM head)."""
    def hook(mod, inputs, out):
        bump = torch.zeros(out.shape[-1], dtype=out.dtype)
        bump[eos] = 1e4
        return out + bump
    return model.lm_head.register_forward_hook(hook)


def test_training_sample_stops_at_the_manifest_eos_without_tokenizer():
    model = tiny_model()
    handle = _eos_always(model, 2)
    try:
        text = sample_text(SimpleNamespace(module=model), _run_cfg({"tokenizer": LLAMA_IDS}), None, stage=0)
    finally:
        handle.remove()
    # prompt = the manifest's EOS (2); generation stops at the first EOS (2), not at a fixed 3
    assert text == "2 2"


def test_training_sample_with_a_foreign_tokenizer(llama_style):
    sp = spm.SentencePieceProcessor(model_file=str(llama_style))
    model = tiny_model(vocab=sp.get_piece_size())
    handle = _eos_always(model, sp.eos_id())
    try:
        text = sample_text(SimpleNamespace(module=model), _run_cfg({"tokenizer": LLAMA_IDS}), str(llama_style), 0)
    finally:
        handle.remove()
    assert text == sp.decode(sp.encode("alpha beta") + [2]) == "alpha beta"


@pytest.mark.timeout(400)
def test_train_and_generate_on_shards_of_a_foreign_tokenizer(llama_style, tmp_path):
    """`llp-prep shard --tokenizer` with Llama-2 ids, a real `llp-pretrain train` (text sample at the
    final eval), then `llp-pretrain generate` from the run directory."""
    import json
    import subprocess
    import sys

    import yaml

    from data_prep import build_shards
    from data_prep.tokenizer import file_sha256
    from tiny_runs import tiny_run_config

    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud"]
    docs = [" ".join(words[(i * k + k * k) % len(words)] for k in range(1, 30)) for i in range(400)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = build_shards([str(tmp_path / "c.jsonl")], llama_style, tmp_path / "ds", seq_len=16, val_fraction=0.05,
                     samples_per_shard=200, quiet=True)
    assert {k: m["tokenizer"][k] for k in LLAMA_IDS} == LLAMA_IDS
    raw = tiny_run_config(tmp_path / "ds", tmp_path / "run",
                          train={"max_steps": 2, "sample_tokens": 6, "sample_prompt": "alpha beta"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    p = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "train", "--config", str(tmp_path / "run.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    sample = [ln for ln in p.stdout.splitlines() if ln.startswith("sample")]
    assert sample and "'alpha beta" in sample[-1], p.stdout[-2000:]  # decoded with the tokenizer, not ids
    assert file_sha256(tmp_path / "run" / "tokenizer.model") == file_sha256(llama_style)
    g = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "generate", "--checkpoint", str(tmp_path / "run"),
                        "--prompt", "alpha beta", "--max-new-tokens", "5", "--seed", "1"],
                       capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-3000:]
    assert g.stdout.startswith("alpha beta")
