"""Generation: cached decoding equals the full forward at every step; LLP's cache stays at two
segments per layer beyond seq_len; sampling options."""
import pytest
import torch

from llp_pretrain.models import LATENT_VARIANTS, ModelConfig, build_model
from llp_pretrain.models.generation import decode_step, prefill, window_logits


def model_for(variant, **kw):
    base = dict(variant=variant, vocab_size=23, d_model=16, n_heads=2, n_layers=3, seq_len=16)
    if variant == "llp":
        base["segment_len"] = 4
    if variant in LATENT_VARIANTS:
        base["latent_len"] = 4
    if variant == "segmented_history":
        base["history_segments"] = 3
    if variant == "compressed_history":
        base["compression_len"] = 5
    base.update(kw)
    torch.manual_seed(0)
    m = build_model(ModelConfig(**base)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m


LLP_REF = dict(shared_kv=True, rope_layers="first", separate_first_segment_proj=True)


@pytest.mark.parametrize("variant,kw,total", [
    ("gpt", {}, 16),
    ("llp", {}, 50),  # beyond seq_len = 16
    ("llp", LLP_REF, 50),
    ("llp", dict(kv_layernorm=True, segment_len=1), 20),
])
@pytest.mark.parametrize("prompt_len", [1, 4, 5])
def test_cached_decoding_matches_full_forward_every_step(variant, kw, total, prompt_len):
    model = model_for(variant, **kw)
    ids = torch.randint(0, 23, (2, total), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(ids)  # LLP takes the whole text; its receptive field is finite
        logits, state = prefill(model, ids[:, :prompt_len])
        torch.testing.assert_close(logits, full[:, prompt_len - 1], atol=1e-4, rtol=0)
        for t in range(prompt_len, total):
            logits = decode_step(model, ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=0)


def test_llp_cache_holds_at_most_two_segments_beyond_seq_len():
    model = model_for("llp")
    L = model.cfg.segment_len
    seen = []
    for blk in model.blocks:
        orig = blk.attn.attend

        def rec(q, k, v, mask=None, causal=False, orig=orig):
            seen.append(k.shape[-2])
            return orig(q, k, v, mask=mask, causal=causal)

        blk.attn.attend = rec
    ids = torch.randint(0, 23, (1, 100))
    with torch.no_grad():
        _, state = prefill(model, ids[:, :3])
        sizes = []
        for t in range(3, 100):
            seen.clear()
            decode_step(model, ids[:, t], state)
            assert max(seen) <= 2 * L
            # past the first segment every step attends to the previous segment + current part
            if t >= L:
                assert min(seen) == L + t % L + 1
            sizes.append(sum(k.numel() + v.numel() for k, v in zip(state.cache.k, state.cache.v)))
    assert len(set(sizes)) == 1  # memory does not grow with the text
    assert sizes[0] == 2 * model.cfg.n_layers * 2 * L * model.cfg.d_model


def test_gpt_beyond_seq_len_uses_the_last_window():
    model = model_for("gpt")
    prompt = torch.randint(0, 23, (1, 10))
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (1, 30)
    with torch.no_grad():
        for t in range(10, 30):
            want = model(out[:, max(0, t - 16):t])[:, -1].argmax(-1)
            assert int(out[0, t]) == int(want), t


@pytest.mark.parametrize("variant", LATENT_VARIANTS)
def test_perceiver_family_generation_follows_the_window(variant):
    model = model_for(variant)
    prompt = torch.randint(0, 23, (2, 7))  # shorter than seq_len
    out = model.generate(prompt, 14, temperature=0)
    assert out.shape == (2, 21)
    with torch.no_grad():
        for t in range(7, 21):
            win = out[:, max(0, t - 16):t]
            assert torch.equal(out[:, t], window_logits(model, win).argmax(-1))
            if variant in ("perceiver_ar", "history_self_attention") or win.shape[1] == 16:
                assert torch.equal(out[:, t], model(win)[:, -1].argmax(-1))


def test_generate_sampling_options():
    model = model_for("llp")
    prompt = [1, 2, 3]
    a = model.generate(prompt, 12, temperature=1.0, seed=5)
    b = model.generate(prompt, 12, temperature=1.0, seed=5)
    assert a.dim() == 1 and a.shape[0] == 15 and torch.equal(a, b)
    assert a[:3].tolist() == prompt
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, top_k=1, seed=9), greedy)
    assert torch.equal(model.generate(prompt, 12, top_p=1e-6, seed=9), greedy)
    draws = {tuple(model.generate(prompt, 12, temperature=2.0, seed=s).tolist()) for s in range(4)}
    assert len(draws) > 1
    top2 = model.generate(prompt, 30, temperature=5.0, top_k=2, seed=1)
    # with top_k=2 every token is one of the two most likely at its step
    with torch.no_grad():
        logits = model(top2[None, :-1])[0]
    for t in range(3, 33):
        assert int(top2[t]) in logits[t - 1].topk(2).indices.tolist()


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = model_for("gpt")
    eos = 3
    with torch.no_grad():
        model.lm_head.bias[eos] = 100.0  # eos always wins
    out = model.generate(torch.tensor([[5, 6], [7, 8]]), 10, temperature=0, eos_id=eos)
    assert out.tolist() == [[5, 6, eos], [7, 8, eos]]
    with pytest.raises(ValueError, match="non-empty"):
        model.generate([], 3)
