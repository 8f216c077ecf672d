"""Causality of every variant, LLP's receptive field, and the LLP sequence-parallel hook.

Dependence is measured two ways: exact gradients of each output row with respect to the input
embeddings (masked attention gives exact zeros), and by changing a token and comparing the
outputs before it.
"""
import random

import pytest
import torch

from llp_pretrain.models import LATENT_VARIANTS, ModelConfig, build_model

REFERENCE_OPTS = dict(shared_kv=True, kv_layernorm=True, rope_layers="first")


def make(variant, reference=False, **kw):
    base = dict(variant=variant, vocab_size=13, d_model=8, n_heads=2, n_layers=2)
    base.update(kw)
    if reference:
        base.update(REFERENCE_OPTS)
        if variant == "llp":
            base.update(separate_first_segment_proj=True, kv_layernorm=False)
        if variant == "compressed_history":
            base.update(compressed_history_residual="truncate")
        if variant == "history_self_attention":
            base.update(rope_layers="all")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**base)).double().eval()
    # larger weights than the default init so that every dependence is far from zero
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model


def dependency(model, ids):
    """Bool (T_out, N): output row r depends on input token j (exact gradient test)."""
    store = {}

    def hook(mod, inp, out):
        out = out.detach().requires_grad_(True)
        store["e"] = out
        return out

    hnd = model.tok_emb.register_forward_hook(hook)
    try:
        logits = model(ids)
    finally:
        hnd.remove()
    e = store["e"]
    N = ids.shape[1]
    w = torch.randn(logits.shape[-1], dtype=logits.dtype, generator=torch.Generator().manual_seed(1))
    dep = torch.zeros(logits.shape[1], N, dtype=torch.bool)
    for r in range(logits.shape[1]):
        (g,) = torch.autograd.grad((logits[0, r] * w).sum(), e, retain_graph=True)
        dep[r] = g[0, :N].abs().sum(-1) > 0
    return dep


def expected_causal(model, N, llp_layers=None):
    sl = model.trained_positions(N)
    rows = range(sl.start, sl.stop)
    exp = torch.zeros(len(rows), N, dtype=torch.bool)
    for r, p in enumerate(rows):
        for j in range(N):
            ok = j <= p
            if llp_layers is not None:
                L = model.cfg.segment_len
                ok = ok and j // L >= p // L - llp_layers
            exp[r, j] = ok
    return exp


CASES = [
    ("gpt", dict(seq_len=9), 9),
    ("gpt", dict(seq_len=5), 1),
    ("llp", dict(seq_len=9, segment_len=3), 9),
    ("llp", dict(seq_len=4, n_segments=1), 4),  # one segment
    ("llp", dict(seq_len=5, segment_len=1), 5),  # segments of one token
    ("llp", dict(seq_len=9, segment_len=3), 7),  # shorter input: padded last segment
    ("perceiver_ar", dict(seq_len=9, latent_len=3), 9),
    ("perceiver_ar", dict(seq_len=7, latent_len=6), 7),  # history of 1
    ("perceiver_ar", dict(seq_len=7, latent_len=1), 7),  # one latent
    ("perceiver_ar", dict(seq_len=9, latent_len=4), 3),  # input shorter than the latents
    ("history_self_attention", dict(seq_len=9, latent_len=3), 9),
    ("history_self_attention", dict(seq_len=7, latent_len=6), 7),
    ("history_self_attention", dict(seq_len=11, latent_len=5), 8),
    ("segmented_history", dict(seq_len=9, latent_len=3, history_segments=3), 9),
    ("segmented_history", dict(seq_len=7, latent_len=2, history_segments=1), 7),
    ("segmented_history", dict(seq_len=5, latent_len=4, history_segments=1), 5),  # h = 1
    ("compressed_history", dict(seq_len=9, latent_len=3, compression_len=2), 9),
    ("compressed_history", dict(seq_len=9, latent_len=3, compression_len=6), 9),  # c = h
    ("compressed_history", dict(seq_len=5, latent_len=4, compression_len=1), 5),  # h = c = 1
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("reference", [False, True], ids=["default", "reference"])
@pytest.mark.parametrize("variant,kw,N", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_outputs_depend_exactly_on_past_tokens(variant, kw, N, reference):
    model = make(variant, reference, **kw)
    ids = torch.randint(0, 13, (1, N), generator=torch.Generator().manual_seed(N))
    dep = dependency(model, ids)
    layers = model.cfg.n_layers if variant == "llp" else None
    want = expected_causal(model, N, llp_layers=layers)
    assert torch.equal(dep, want), f"\n{dep.int()}\n!=\n{want.int()}"
    # the diagonal is present: the output at p depends on token p itself
    sl = model.trained_positions(N)
    assert all(dep[r, p] for r, p in enumerate(range(sl.start, sl.stop)))


@pytest.mark.parametrize("reference", [False, True], ids=["default", "reference"])
@pytest.mark.parametrize("variant,kw,N", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_changing_a_token_never_changes_earlier_outputs(variant, kw, N, reference):
    model = make(variant, reference, **kw)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 13, (2, N), generator=gen)
    sl = model.trained_positions(N)
    with torch.no_grad():
        base = model(ids)
        for t in range(N):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1 + t) % 13
            out = model(changed)
            rows_before = [r for r, p in enumerate(range(sl.start, sl.stop)) if p < t]
            rows_after = [r for r, p in enumerate(range(sl.start, sl.stop)) if p == t]
            if rows_before:
                assert torch.equal(out[:, rows_before], base[:, rows_before]), (t, rows_before)
            for r in rows_after:
                assert not torch.allclose(out[:, r], base[:, r]), (t, r)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", ["gpt", "llp", *LATENT_VARIANTS])
def test_causality_sampled_at_larger_size(variant):
    kw = dict(seq_len=96, d_model=16, n_heads=2)
    if variant == "llp":
        kw["segment_len"] = 16
    if variant in LATENT_VARIANTS:
        kw["latent_len"] = 32
    if variant == "segmented_history":
        kw["history_segments"] = 4
    if variant == "compressed_history":
        kw["compression_len"] = 24
    model = make(variant, **kw)
    rng = random.Random(3)
    ids = torch.randint(0, 13, (1, 96), generator=torch.Generator().manual_seed(5))
    sl = model.trained_positions(96)
    with torch.no_grad():
        base = model(ids)
        for t in rng.sample(range(96), 6) + [sl.start, 95]:
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 3) % 13
            out = model(changed)
            for r, p in enumerate(range(sl.start, sl.stop)):
                if p < t:
                    assert torch.equal(out[0, r], base[0, r]), (t, p)
                elif p == t:
                    assert not torch.allclose(out[0, r], base[0, r]), (t, p)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("reference", [False, True], ids=["default", "reference"])
def test_llp_receptive_field_follows_segment_pair_rule(n_layers, reference):
    """Output at p depends on token p - k exactly when seg(p - k) >= seg(p) - n_layers."""
    L, N = 3, 15
    model = make("llp", reference, seq_len=N, segment_len=L, n_layers=n_layers)
    ids = torch.randint(0, 13, (1, N), generator=torch.Generator().manual_seed(2))
    dep = dependency(model, ids)
    for p in range(N):
        for k in range(N):
            j = p - k
            want = 0 <= j and j // L >= p // L - n_layers
            if j >= 0:
                assert bool(dep[p, j]) == want, (p, k)
        # receptive field size: n_layers whole segments plus the current segment's prefix
        span = p - max(0, (p // L - n_layers) * L) + 1
        assert int(dep[p].sum()) == span


# ---- LLP sequence-parallel hook ----------------------------------------------------------

class FakeSeqParallel:
    """In-process stand-in for the distributed halo exchange: rank r gets the keys/values that
    rank r - 1 sent, layer by layer."""

    def __init__(self, position_offset, previous=None):
        self.position_offset = position_offset
        self.previous = previous  # FakeSeqParallel of rank r - 1, or None on rank 0
        self.sent = []

    def exchange_halo(self, k_last, v_last):
        assert k_last.dim() == 4
        self.sent.append((k_last, v_last))
        if self.previous is None:
            return None
        return self.previous.sent[len(self.sent) - 1]


@pytest.mark.parametrize("reference", [False, True], ids=["default", "reference"])
@pytest.mark.parametrize("n_chunks", [2, 3])
def test_llp_chunked_forward_with_halo_equals_full_forward(reference, n_chunks):
    L, S = 2, 6
    N = L * S
    model = make("llp", reference, seq_len=N, segment_len=L, n_layers=3)
    ids = torch.randint(0, 13, (2, N), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    (g_full,) = torch.autograd.grad((full ** 2).sum(), model.blocks[0].attn.q_proj.weight)
    chunk = N // n_chunks
    outs, prev = [], None
    for r in range(n_chunks):
        sp = FakeSeqParallel(r * chunk, prev)
        outs.append(model(ids[:, r * chunk:(r + 1) * chunk], seq_parallel=sp))
        assert len(sp.sent) == model.cfg.n_layers
        k, v = sp.sent[0]
        assert k.shape == (2, model.cfg.n_heads, L, model.cfg.head_dim)
        assert (v is None) == model.cfg.shared_kv
        prev = sp
    chunked = torch.cat(outs, dim=1)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-10)
    # gradients flow back through the halo into earlier chunks
    (g_chunk,) = torch.autograd.grad((chunked ** 2).sum(), model.blocks[0].attn.q_proj.weight)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-9, atol=1e-10)


def test_llp_seq_parallel_rejects_partial_segments():
    model = make("llp", seq_len=8, segment_len=4)
    with pytest.raises(ValueError, match="whole number of segments"):
        model(torch.zeros(1, 6, dtype=torch.long), seq_parallel=FakeSeqParallel(0))
    with pytest.raises(ValueError, match="position_offset"):
        model(torch.zeros(1, 4, dtype=torch.long), seq_parallel=FakeSeqParallel(2))


class ReplayingFakeSeqParallel(FakeSeqParallel):
    """The contract of ``seq_parallel`` under activation checkpointing (the model keeps no guard of
    its own; ``parallel/halo.py`` implements it for real): a call that re-computes an exchange
    already made (same ``k_last``) gets the same reply and sends nothing again."""

    def __init__(self, position_offset, previous=None):
        super().__init__(position_offset, previous)
        self.calls = 0

    def exchange_halo(self, k_last, v_last):
        self.calls += 1
        for i, (k, _) in enumerate(self.sent):
            if torch.equal(k, k_last):  # a recomputation: replay
                return None if self.previous is None else self.previous.sent[i]
        return super().exchange_halo(k_last, v_last)


def test_llp_halo_with_checkpointing_exchanges_once_and_matches_gradients():
    L, N = 2, 8
    model = make("llp", seq_len=N, segment_len=L, n_layers=2, checkpoint_activations=True)
    model.train()
    ids = torch.randint(0, 13, (1, N), generator=torch.Generator().manual_seed(9))
    params = [p for p in model.parameters()]
    model.cfg.checkpoint_activations = False
    want = torch.autograd.grad((model(ids) ** 2).sum(), params)
    model.cfg.checkpoint_activations = True
    sp0 = ReplayingFakeSeqParallel(0)
    out0 = model(ids[:, :N // 2], seq_parallel=sp0)
    sp1 = ReplayingFakeSeqParallel(N // 2, sp0)
    out1 = model(ids[:, N // 2:], seq_parallel=sp1)
    got = torch.autograd.grad((torch.cat([out0, out1], 1) ** 2).sum(), params)
    assert sp0.calls == sp1.calls == 2 * model.cfg.n_layers  # forward, then the recomputation in backward
    assert len(sp0.sent) == len(sp1.sent) == model.cfg.n_layers  # the recomputation was replayed
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
