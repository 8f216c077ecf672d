"""ModelConfig validation, the loss helper, activation checkpointing, tied embeddings,
FLOPs and parameter counts."""
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from llp_pretrain.models import (
    LATENT_VARIANTS,
    VARIANTS,
    ModelConfig,
    build_model,
    flops_per_token,
    lm_loss,
)
from llp_pretrain.models.flops import forward_flops_breakdown, visible_pairs


def cfg_for(variant, **kw):
    base = dict(variant=variant, vocab_size=17, d_model=16, n_heads=2, n_layers=2, seq_len=12)
    if variant == "llp":
        base["segment_len"] = 4
    if variant in LATENT_VARIANTS:
        base["latent_len"] = 4
    if variant == "segmented_history":
        base["history_segments"] = 2
    if variant == "compressed_history":
        base["compression_len"] = 3
    base.update(kw)
    return ModelConfig(**base)


# ---- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,fields", [
    (dict(variant="llp", seq_len=10, segment_len=4), ["seq_len", "segment_len"]),
    (dict(variant="llp", seq_len=12, n_segments=5), ["seq_len", "n_segments"]),
    (dict(variant="llp", seq_len=12, segment_len=4, n_segments=2),
     ["segment_len", "n_segments", "seq_len"]),
    (dict(variant="llp", seq_len=12), ["segment_len", "n_segments"]),
    (dict(variant="perceiver_ar", seq_len=12, latent_len=12), ["latent_len", "seq_len"]),
    (dict(variant="perceiver_ar", seq_len=12), ["latent_len"]),
    (dict(variant="gpt", d_model=18, n_heads=4), ["d_model", "n_heads"]),
    (dict(variant="gpt", d_model=12, n_heads=4), ["d_model", "n_heads"]),  # odd head width
    (dict(variant="segmented_history", seq_len=12, latent_len=4, history_segments=3),
     ["history_segments"]),
    (dict(variant="segmented_history", seq_len=12, latent_len=4), ["history_segments"]),
    (dict(variant="compressed_history", seq_len=12, latent_len=4, compression_len=9),
     ["compression_len"]),
    (dict(variant="gpt", separate_first_segment_proj=True), ["separate_first_segment_proj"]),
    (dict(variant="gpt", d_modle=16), ["d_modle"]),
    (dict(variant="transformer"), ["variant"]),
    (dict(variant="gpt", rope_layers="some"), ["rope_layers"]),
    (dict(variant="gpt", dropout=1.5), ["dropout"]),
])
def test_invalid_config_names_the_fields(kw, fields):
    base = dict(vocab_size=17, d_model=16, n_heads=2, n_layers=2, seq_len=12)
    base.update(kw)
    with pytest.raises(ValidationError) as err:
        ModelConfig(**base)
    for f in fields:
        assert f in str(err.value), (f, str(err.value))


def test_segments_are_derived_and_defaults():
    c = ModelConfig(variant="llp", vocab_size=5, d_model=8, n_heads=2, n_layers=1, seq_len=12,
                    segment_len=3)
    assert c.n_segments == 4
    c = ModelConfig(variant="llp", vocab_size=5, d_model=8, n_heads=2, n_layers=1, seq_len=12,
                    n_segments=2)
    assert c.segment_len == 6
    assert c.dropout == 0.0 and not c.tie_embeddings and not c.checkpoint_activations
    c = ModelConfig(variant="compressed_history", vocab_size=5, d_model=8, n_heads=2,
                    n_layers=1, seq_len=16, latent_len=4)
    assert c.compression_len == 4  # reference default seq_len // 4


def test_forward_rejects_bad_inputs():
    m = build_model(cfg_for("segmented_history"))
    with pytest.raises(ValueError, match="seq_len=12"):
        m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        m(torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="only supported by variant 'llp'"):
        build_model(cfg_for("gpt"))(torch.zeros(1, 12, dtype=torch.long), seq_parallel=object())


# ---- loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_loss_scores_each_position_against_next_token_once(variant):
    torch.manual_seed(0)
    model = build_model(cfg_for(variant, loss_chunk_len=0))  # one head call: logits captured
    captured = []
    hnd = model.lm_head.register_forward_hook(lambda mod, inp, out: captured.append(out))
    tokens = torch.randint(0, 17, (3, 13))
    loss_sum, n = lm_loss(model, tokens)
    hnd.remove()
    assert len(captured) == 1
    sl = model.trained_positions(12)
    T = sl.stop - sl.start
    logits = captured[0].view(3, T, 17)
    assert n == 3 * (sl.stop - sl.start) and logits.shape[1] == sl.stop - sl.start
    # the one-hot targets recovered from the gradient: softmax(logits) - dloss/dlogits
    (g,) = torch.autograd.grad(loss_sum, captured[0])
    g = g.view(3, T, 17)
    onehot = logits.softmax(-1) - g
    want = F.one_hot(tokens[:, sl.start + 1:sl.stop + 1], 17).to(onehot.dtype)
    torch.testing.assert_close(onehot, want, atol=1e-5, rtol=0)
    # and the value is the summed CE of position i against token i + 1
    manual = sum(-logits[b, r].log_softmax(-1)[tokens[b, sl.start + r + 1]]
                 for b in range(3) for r in range(logits.shape[1]))
    torch.testing.assert_close(loss_sum, manual)


def test_lm_loss_rejects_bad_shape():
    with pytest.raises(ValueError, match="tokens must be"):
        lm_loss(build_model(cfg_for("gpt")), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        build_model(cfg_for("llp"))(torch.zeros(2, 12, dtype=torch.long),
                                    targets=torch.zeros(2, 11, dtype=torch.long))


@pytest.mark.parametrize("chunk", [1, 5, 7, 36])
@pytest.mark.parametrize("variant,kw", [
    ("llp", {}), ("llp", dict(tie_embeddings=True, bias=False)), ("gpt", {}),
    ("perceiver_ar", {}), ("compressed_history", dict(checkpoint_activations=True)),
])
def test_chunked_loss_equals_unchunked_in_value_and_gradients(variant, kw, chunk):
    """Chunks of 1, 5, 7 (not dividing the rows) and all rows against one unchunked pass."""
    tokens = torch.randint(0, 17, (3, 13), generator=torch.Generator().manual_seed(chunk))
    out = []
    for c in (0, chunk):
        torch.manual_seed(3)
        model = build_model(cfg_for(variant, loss_chunk_len=c, **kw)).train()
        loss, n = lm_loss(model, tokens)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        out.append((loss.detach(), n, grads))
    (l0, n0, g0), (l1, n1, g1) = out
    assert n0 == n1
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    """Every head call sees at most loss_chunk_len rows, and in backward the head runs again
    once per chunk (recomputation); the loss value does not need any (B, N, V) tensor."""
    model = build_model(cfg_for("llp", loss_chunk_len=8)).train()
    rows = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[0]))
    loss, n = lm_loss(model, torch.randint(0, 17, (2, 13)))
    assert n == 24 and rows == [8, 8, 8]
    loss.backward()
    assert rows == [8, 8, 8] * 2
    with torch.no_grad():  # evaluation: chunked, no recomputation
        rows.clear()
        lm_loss(model, torch.randint(0, 17, (2, 13)))
        assert rows == [8, 8, 8]


# ---- checkpointing and tied embeddings ----------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpointing_gives_identical_loss_and_grads(variant, tie):
    torch.manual_seed(1)
    plain = build_model(cfg_for(variant, tie_embeddings=tie)).train()
    ckpt = build_model(cfg_for(variant, tie_embeddings=tie, checkpoint_activations=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    if tie:
        assert ckpt.lm_head.weight is ckpt.tok_emb.weight
        assert plain.num_params() == plain.num_params(exclude_embeddings=True) + 17 * 16
    calls = {"plain": 0, "ckpt": 0}
    plain.blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    tokens = torch.randint(0, 17, (2, 13))
    results = []
    for model in (plain, ckpt):
        loss, n = lm_loss(model, tokens)
        params = [p for _, p in model.named_parameters()]
        # torch.autograd.grad works only with non-reentrant checkpointing
        grads = torch.autograd.grad(loss / n, params)
        results.append((loss.detach(), grads))
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block was recomputed
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---- FLOPs and parameters ----------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(shared_kv=True)], ids=["separate_kv", "shared_kv"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_linear_part_matches_torch_flop_counter(variant, kw):
    cfg = cfg_for(variant, **kw)
    model = build_model(cfg)
    ids = torch.randint(0, 17, (1, 12))
    fc = FlopCounterMode(display=False)
    with fc:
        model(ids)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    measured = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) + counts.get("aten.bmm", 0)
    assert forward_flops_breakdown(cfg, 12)["linear"] == measured
    b = forward_flops_breakdown(cfg, 12)
    assert flops_per_token(cfg, 12) == pytest.approx(3 * (b["linear"] + b["attention"]) / 12)
    assert model.flops_per_token() == flops_per_token(cfg, 12)


def _dependency_pairs(model, N):
    """Count (output row, input token) dependences of a 1-layer model, every row."""
    store = {}

    def hook(mod, inp, out):
        out = out.detach().requires_grad_(True)
        store["e"] = out
        return out

    model.tok_emb.register_forward_hook(hook)
    ids = torch.randint(0, 17, (1, N))
    out = model(ids, return_all=True)
    total = 0
    for r in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[0, r].sum(), store["e"], retain_graph=True)
        total += int((g[0, :N].abs().sum(-1) > 0).sum())
    return total


@pytest.mark.parametrize("variant", ["gpt", "llp", "perceiver_ar", "history_self_attention",
                                     "segmented_history"])
def test_visible_pairs_match_measured_dependences(variant):
    cfg = cfg_for(variant, n_layers=1)
    model = build_model(cfg).double()
    assert visible_pairs(cfg, 12, 0) == _dependency_pairs(model, 12)


def test_flops_llp_linear_in_n_and_gpt_quadratic():
    def attn(variant, N):
        kw = dict(seq_len=N)
        if variant == "llp":
            kw["segment_len"] = 4
        return forward_flops_breakdown(cfg_for(variant, **kw), N)["attention"]

    assert attn("llp", 1024) / attn("llp", 512) == pytest.approx(2.0, rel=0.01)
    assert attn("gpt", 64) / attn("gpt", 32) == pytest.approx(4.0, rel=0.05)


def test_num_params_counts_every_parameter_once():
    cfg = cfg_for("llp", separate_first_segment_proj=True, shared_kv=True)
    m = build_model(cfg)
    D, V, r = 16, 17, 4
    per_layer = (2 * D  # attn norm
                 + D * D + D * D  # q, kv
                 + 2 * (D * D + D)  # out_proj, out_proj_first
                 + 2 * D  # mlp norm
                 + D * r * D + r * D + r * D * D + D)  # mlp
    assert m.num_params() == V * D + 2 * per_layer + 2 * D + V * D + V


def test_llp_attention_never_builds_an_n_by_n_problem(monkeypatch):
    """Two SDPA calls per layer, none wider than one segment pair."""
    from types import SimpleNamespace

    import llp_pretrain.models.pair_attention as pa

    calls = []
    real = pa.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), type(attn_mask).__name__))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(pa, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    cfg = cfg_for("llp", seq_len=64, segment_len=8, n_layers=2)
    build_model(cfg)(torch.randint(0, 17, (2, 64)))
    assert calls, "attention must go through scaled_dot_product_attention"
    for q, k, mask in calls:
        assert q[-2] <= 8 and k[-2] <= 16, (q, k)
        assert mask in ("NoneType", "CausalBias")
    # per layer: one causal call for segment 0 and one batched call for the 7 segment pairs
    assert len(calls) == 4 and calls[1][0] == (2 * 7, 2, 8, 8)
