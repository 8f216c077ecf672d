"""LLP pair attention (public SDPA with ``causal_lower_right`` on segment pairs) against a dense
float64 reference that writes the visibility rule out position by position.

Values and every gradient, with and without a sequence-parallel halo, shared keys/values,
grouped-query heads, odd sizes (``L`` not a multiple of 8, one and two segments); dropout.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llp_pretrain.models import pair_attention as pa


def _dense_reference(q, k, v, L, halo):
    """float64 softmax attention with the LLP rule written out position by position; key/value
    head ``j`` serves query heads ``j * G .. (j + 1) * G - 1``."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.shape[2]
    if halo is not None:
        k = torch.cat([halo[0].double(), k], dim=2)
        v = torch.cat([(halo[1] if halo[1] is not None else halo[0]).double(), v], dim=2)
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    off = k.shape[2] - T  # key index of query 0
    visible = torch.zeros(T, k.shape[2], dtype=torch.bool)
    for i in range(T):
        seg = i // L
        lo = max(0, (seg - 1) * L) if halo is None else seg * L  # keys of segment seg - 1
        visible[i, lo:off + i + 1] = True
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible, float("-inf"))
    return s.softmax(-1) @ v


def _inputs(B, H, S, L, d, halo, shared, dtype=torch.float32, seed=0, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    T = S * L
    Hkv = Hkv or H

    def r(b, h, t, dd):
        # SDPA-style layout: (B, H, T, d) views of (B, T, H, d) memory
        x = torch.randn(b, t, h, dd, generator=g, dtype=dtype)
        return x.transpose(1, 2).requires_grad_()

    q, k = r(B, H, T, d), r(B, Hkv, T, d)
    v = k if shared else r(B, Hkv, T, d)
    hal = None
    if halo:
        kp = r(B, Hkv, L, d)
        hal = (kp, kp if shared else r(B, Hkv, L, d))
    return q, k, v, hal


CASES = [
    # B, H, Hkv, S, L, d, halo, shared
    (1, 2, 2, 5, 4, 8, False, False),
    (3, 2, 2, 4, 8, 4, False, False),
    (2, 1, 1, 1, 6, 8, False, False),   # a single segment: causal only
    (2, 2, 2, 2, 5, 8, False, False),   # two segments, L not a multiple of 8
    (2, 3, 3, 3, 5, 4, False, True),    # shared keys/values, odd sizes
    (1, 2, 2, 3, 1, 4, False, False),   # segments of one token
    (2, 2, 2, 3, 4, 8, True, False),    # sequence-parallel halo
    (1, 2, 2, 1, 4, 8, True, True),     # halo, one segment, shared
    (2, 2, 2, 2, 7, 4, True, False),    # halo, two segments, L = 7
    (2, 4, 2, 3, 5, 4, False, False),   # grouped-query: 2 query heads per key/value head
    (1, 6, 2, 1, 3, 4, False, True),    # GQA, one segment, shared
    (2, 4, 1, 2, 4, 8, True, False),    # multi-query with a halo
    (1, 4, 2, 3, 3, 4, True, True),     # GQA, halo, shared
]


@pytest.mark.parametrize("B,H,Hkv,S,L,d,halo,shared", CASES)
def test_pair_attention_matches_dense_rule(B, H, Hkv, S, L, d, halo, shared):
    q, k, v, hal = _inputs(B, H, S, L, d, halo, shared, Hkv=Hkv)
    leaves = [q, k] + ([] if shared else [v]) + (
        [] if hal is None else [hal[0]] + ([] if shared else [hal[1]]))
    out = pa.pair_attention(q, k, v, L, d ** -0.5, halo=hal)
    assert out.shape == q.shape
    ref = _dense_reference(q, k, v, L, hal)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)

    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, leaves, go)
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    for name, a, b in zip("qkvhw", grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("halo", [False, True])
def test_float64_inputs_match_the_reference_to_float64_precision(halo):
    q, k, v, hal = _inputs(2, 4, 3, 6, 4, halo, False, dtype=torch.float64, Hkv=2)
    out = pa.pair_attention(q, k, v, 6, 4 ** -0.5, halo=hal)
    torch.testing.assert_close(out, _dense_reference(q, k, v, 6, hal), atol=1e-12, rtol=1e-12)


def test_merging_heads_of_the_output_is_free():
    """The output is a (B, H, T, d) view of (B, T, H, d) memory (no copy in merge_heads)."""
    q, k, v, _ = _inputs(2, 2, 4, 4, 8, False, False)
    out = pa.pair_attention(q, k, v, 4, 0.3)
    assert out.transpose(1, 2).is_contiguous()


def test_only_segment_pairs_reach_sdpa(monkeypatch):
    """One is_causal call for segment 0 and one lower-right call over all pairs, never wider
    than one pair, and the pair call carries causal_lower_right, not a mask tensor."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), type(attn_mask).__name__, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    # replace the module's F only: CausalBias dispatches on the real function's identity
    monkeypatch.setattr(pa, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    q, k, v, hal = _inputs(2, 4, 5, 8, 8, True, False, Hkv=2)
    pa.pair_attention(q, k, v, 8, 0.3)
    assert calls == [((2, 4, 8, 8), (2, 4, 8, 8), "NoneType", True),
                     ((8, 4, 8, 8), (8, 4, 16, 8), "CausalBias", False)]
    calls.clear()
    pa.pair_attention(q, k, v, 8, 0.3, halo=hal)
    assert calls == [((10, 4, 8, 8), (10, 4, 16, 8), "CausalBias", False)]


def test_causal_lower_right_is_the_pair_mask():
    from torch.nn.attention.bias import causal_lower_right

    for L in (1, 3, 8):
        assert torch.equal(causal_lower_right(L, 2 * L)._materialize(), pa.pair_mask(L))


def test_dropout_drops_attention_probabilities_and_keeps_the_visibility_rule():
    """With dropout the output changes between calls; every output row still depends only on
    the keys the rule lets it see (exact zero gradients elsewhere), and dropout_p = 0 is exact."""
    q, k, v, _ = _inputs(1, 2, 3, 4, 8, False, False)
    torch.manual_seed(0)
    a = pa.pair_attention(q, k, v, 4, 8 ** -0.5, dropout_p=0.5)
    b = pa.pair_attention(q, k, v, 4, 8 ** -0.5, dropout_p=0.5)
    assert not torch.allclose(a, b)
    ref = _dense_reference(q, k, v, 4, None)
    torch.testing.assert_close(pa.pair_attention(q, k, v, 4, 8 ** -0.5, dropout_p=0.0).double(),
                               ref, atol=2e-6, rtol=1e-5)
    for i in (0, 3, 4, 7, 11):
        (gk,) = torch.autograd.grad(a[0, :, i].sum(), k, retain_graph=True)
        seen = gk[0].abs().sum((0, 2)) > 0
        lo = max(0, (i // 4 - 1) * 4)
        assert not seen[:lo].any() and not seen[i + 1:].any(), (i, seen)


def test_bad_shapes_are_refused():
    q, k, v, hal = _inputs(2, 2, 2, 4, 8, True, False)
    cases = [
        ((q, k, v, 3), "not a positive multiple of segment_len 3"),
        ((q, k, v, 0), "segment_len must be a positive int"),
        ((q, k[:, :, :4], v, 4), "one shape"),  # fewer keys than queries
        ((q, k[:, :1].expand(2, 1, 8, 8), v, 4), "one shape"),  # k and v heads differ
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0], 4), "not a positive multiple"),
        ((q[0], k[0], v[0], 4), r"\(B, H, T, d\)"),
    ]
    q3, k3, v3, _ = _inputs(1, 3, 2, 4, 8, False, False, Hkv=2)
    cases.append(((q3, k3, v3, 4), "Hkv dividing H"))
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            pa.pair_attention(*args, 0.5)
    with pytest.raises(ValueError, match="halo keys/values must be"):
        pa.pair_attention(q, k, v, 4, 0.5, halo=(hal[0][:, :, :2], hal[1][:, :, :2]))


def test_halo_without_values_means_shared():
    q, k, _, hal = _inputs(2, 2, 3, 4, 8, True, True)
    torch.testing.assert_close(pa.pair_attention(q, k, k, 4, 0.3, halo=(hal[0], None)),
                               pa.pair_attention(q, k, k, 4, 0.3, halo=(hal[0], hal[0])))


def test_bf16_is_close_to_float64():
    q, k, v, _ = _inputs(2, 2, 4, 8, 8, False, False, dtype=torch.bfloat16)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ref = _dense_reference(q, k, v, 8, None)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    out = pa.pair_attention(q, k, v, 8, 8 ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), go.to(out.dtype))
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 0.05
