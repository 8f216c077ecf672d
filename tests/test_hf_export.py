"""`llp-pretrain export --format hf`: the directory loads with transformers' Auto classes and
behaves as our own model and tokenizer (logits, generation, cache, bf16, sharding, model card),
its modeling code is the models package's source, and the PerceiverAR family is refused."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the HF export tests need the test extra (transformers)")

from hf_fixtures import REPO, SEQ_LEN, STEPS, MICRO, clean_env, kjv_runs  # noqa: F401,E402

from llp_pretrain.cli import main as cli_main  # noqa: E402
from llp_pretrain.export import load_model  # noqa: E402
from llp_pretrain.hf import bundle  # noqa: E402

TEXT = ("In the beginning God created the heaven and the earth.\n  2 And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n"
        "  3 And God said, Let there be light: and there was light.\n")


@pytest.fixture(scope="module")
def exported(kjv_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_export")
    dirs = {}
    for v in ("llp", "gpt"):
        assert cli_main(["export", str(kjv_runs["runs"][v]), str(out / v), "--format", "hf"]) == 0
        dirs[v] = out / v
    return dirs


def _load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **kw).eval()


def _ids(path, text=TEXT):
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)(text)["input_ids"]])


@pytest.mark.parametrize("variant", ["llp", "gpt"])
def test_logits_equal_ours_fp32(exported, kjv_runs, variant):
    hf = _load(exported[variant])
    ours, _, _ = load_model(kjv_runs["runs"][variant])
    ids = _ids(exported[variant])
    assert ids.shape[1] > SEQ_LEN  # longer than the trained window too
    with torch.no_grad():
        for x in (ids[:, :SEQ_LEN], ids[:, :37], ids):
            a, b = hf(x).logits, ours(x)
            assert a.dtype == torch.float32 and a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-5
        x = ids[:, :SEQ_LEN]
        loss = hf(x, labels=x).loss  # transformers' shifted mean next-token cross-entropy
        want = torch.nn.functional.cross_entropy(ours(x)[0, :-1], x[0, 1:])
        assert abs(loss.item() - want.item()) <= 1e-5


@pytest.mark.parametrize("variant", ["llp", "gpt"])
def test_generate_matches_ours_past_the_window(exported, kjv_runs, variant):
    hf = _load(exported[variant])
    ours, _, _ = load_model(kjv_runs["runs"][variant])
    ids = _ids(exported[variant])
    for prompt_len in (SEQ_LEN - 24, SEQ_LEN + 3):  # a prompt that grows past seq_len, and a longer one
        prompt = ids[:, :prompt_len]
        got = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None)
        want = ours.generate(prompt[0], 32, temperature=0)
        assert torch.equal(got[0], want)
    beams = hf.generate(ids[:, :8], max_new_tokens=12, do_sample=False, num_beams=3, eos_token_id=None)
    assert beams.shape == (1, 20) and torch.equal(beams[0, :8], ids[0, :8])


def test_llp_cache_is_flat_and_exact(exported):
    """Token-by-token decoding through the transformers cache equals the full forward, and the
    cache holds two segments per layer however long the text."""
    hf = _load(exported["llp"])
    ids = _ids(exported["llp"])
    L = hf.config.segment_len
    with torch.no_grad():
        full = hf(ids).logits
        out = hf(ids[:, :3], use_cache=True)
        cache = out.cache
        steps = [out.logits]
        for t in range(3, ids.shape[1]):
            out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            assert out.cache is cache
            steps.append(out.logits)
    assert type(cache).__name__ == "LLPPretrainCache" and cache.get_seq_length() == ids.shape[1]
    assert all(k.shape[2] == 2 * L for k in cache.state.cache.k)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_padding_rules(exported):
    hf = _load(exported["gpt"])
    ids = _ids(exported["gpt"])[:, :20]
    right = torch.ones(1, 20, dtype=torch.long)
    right[:, 15:] = 0
    with torch.no_grad():
        diff = hf(ids, attention_mask=right).logits[:, :15] - hf(ids[:, :15]).logits
        assert diff.abs().max().item() <= 1e-5  # causal: the padding changes nothing before it
        with pytest.raises(ValueError, match="left padding"):
            hf(ids, attention_mask=right.flip(1))


def test_bfloat16_loads_and_generates(exported, kjv_runs):
    for v in ("llp", "gpt"):
        hf = _load(exported[v], dtype=torch.bfloat16)
        assert next(hf.parameters()).dtype == torch.bfloat16
        ids = _ids(exported[v])[:, :SEQ_LEN]
        ours, _, _ = load_model(kjv_runs["runs"][v])
        with torch.no_grad():
            a, b = hf(ids).logits, ours(ids)
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).abs().max().item() < 0.1 * b.abs().max().item()  # bf16 rounding only
        out = hf.generate(ids[:, :5], max_new_tokens=SEQ_LEN, do_sample=True, top_k=20)
        assert out.shape == (1, 5 + SEQ_LEN)


def test_tokenizer_equals_ours_on_real_text(exported, kjv_runs):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exported["llp"]))
    sp = spm.SentencePieceProcessor(model_file=str(kjv_runs["data"]["tokenizer"]))
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    text = gzip.open(REPO / "data_prep" / "data" / "kjv.txt.gz", "rt", encoding="utf-8").read()
    texts = [text[i:i + 2000] for i in range(0, len(text), len(text) // 150)]
    texts += ["  two  spaces,\ttab\n\n\nthree newlines  ", " leading space", "trailing space ", "\n", " ", "",
              "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001F642 \u00a0nbsp", "<s> literal </s> <unk> <pad>", "\u2581x",
              "1234567890 x2"]
    for t in texts:
        ids = sp.encode(t)
        assert tok(t, add_special_tokens=False)["input_ids"] == ids, t[:80]
        assert tok(t)["input_ids"] == ids  # no BOS/EOS added, as in our shards
        assert tok.decode(ids) == sp.decode(ids), t[:80]
        assert "\u2581" in t or tok.decode(ids) == t  # lossless but for a literal U+2581, as ours
    assert any(sp.is_byte(i) for t in texts for i in sp.encode(t))  # byte fallback was exercised


def test_sharded_weights_load(kjv_runs, tmp_path):
    from llp_pretrain.hf.export import export_hf

    out = export_hf(kjv_runs["runs"]["gpt"], tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards)
    hf = _load(out)
    ours, _, _ = load_model(kjv_runs["runs"]["gpt"])
    ids = _ids(out)[:, :SEQ_LEN]
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5


def test_config_and_model_card(exported, kjv_runs):
    cfg = json.loads((exported["llp"] / "config.json").read_text())
    meta = json.loads((kjv_runs["runs"]["llp"] / "checkpoints" / f"step{STEPS:08d}" / "run_meta.json").read_text())
    for k, v in meta["model"].items():
        if k != "checkpoint_activations":
            assert cfg[k] == v, k
    assert cfg["model_type"] == "llp_pretrain" and cfg["tie_word_embeddings"] is True
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_llp_pretrain.LLPPretrainForCausalLM"
    card = (exported["llp"] / "README.md").read_text()
    hashes = json.loads((kjv_runs["runs"]["llp"] / "hashes.json").read_text())
    assert hashes["manifest_sha256"] in card
    assert f"training tokens: {STEPS * MICRO * SEQ_LEN:,}" in card
    from llp_pretrain.hf.card import last_validation

    val = last_validation(kjv_runs["runs"]["llp"], STEPS)
    assert val["step"] == STEPS and f"{val['loss']:.4f}" in card and f"{val['bits_per_byte']:.4f}" in card


def test_modeling_code_is_the_models_package(exported):
    """Drift check: every bundled module is the models package's file with only its relative
    imports renamed, the bundle covers every module those import, and an export's code is the
    current bundle."""
    names = bundle.model_modules()
    assert {"model", "layers", "llp", "gpt", "config", "pair_attention", "generation"} <= set(names)
    sources = bundle.bundle_sources()
    for m in names:
        orig = (bundle.MODELS_DIR / f"{m}.py").read_text()
        got = sources[f"{bundle.flat_name(m)}.py"]
        body = got.split("\n", 1)[1]
        assert body.count("\n") == orig.count("\n")
        for a, b in zip(orig.split("\n"), body.split("\n")):
            if a != b:
                assert a.lstrip().startswith("from .") and b == bundle.rewrite_imports(a), (m, a, b)
        for dep in bundle._relative_imports(orig, m):
            assert f"{bundle.flat_name(dep)}.py" in sources
    for name, text in sources.items():
        assert (exported["llp"] / name).read_text() == text, name
    cfg = json.loads((exported["llp"] / "config.json").read_text())
    assert cfg["llp_models_sha256"] == bundle.sources_sha256()


def test_export_loads_without_llp_pretrain(exported, tmp_path):
    """The exported code needs torch, transformers and pydantic only: load it in a process where
    importing llp_pretrain fails."""
    ids = _ids(exported["llp"])
    with torch.no_grad():
        want = _load(exported["llp"])(ids).logits
    torch.save({"ids": ids, "want": want}, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['llp_pretrain'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(exported['llp'])!r}, trust_remote_code=True).eval()\n"
        f"d = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    assert (m(d['ids']).logits - d['want']).abs().max().item() == 0.0\n"
        "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_perceiver_family_is_refused(kjv_runs, tmp_path, capsys):
    assert cli_main(["export", str(kjv_runs["runs"]["perceiver_ar"]), str(tmp_path / "pa"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'perceiver_ar'" in err and "--format safetensors" in err
    assert not (tmp_path / "pa").exists()
    assert cli_main(["export", str(kjv_runs["runs"]["perceiver_ar"]), str(tmp_path / "pa2")]) == 0  # default format
