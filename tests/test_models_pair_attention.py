"""The two LLP pair-attention implementations against a dense float64 reference.

``pair_attention_cpu`` (SDPA's CPU flash kernel on overlapping key windows, own backward) and
``pair_attention_sdpa`` (public SDPA on concatenated pairs) must both equal softmax attention
under the explicit LLP visibility rule, in values and in every gradient, with and without a
sequence-parallel halo, with shared keys/values, several batch elements and one segment.
"""
import pytest
import torch

from llp_pretrain.models import pair_attention as pa


def _dense_reference(q, k, v, L, halo):
    """float64 softmax attention with the LLP rule written out position by position."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.shape[2]
    if halo is not None:
        k = torch.cat([halo[0].double(), k], dim=2)
        v = torch.cat([halo[1].double(), v], dim=2)
    off = k.shape[2] - T  # key index of query 0
    visible = torch.zeros(T, k.shape[2], dtype=torch.bool)
    for i in range(T):
        seg = i // L
        lo = max(0, (seg - 1) * L) if halo is None else seg * L  # keys of segment seg - 1
        visible[i, lo:off + i + 1] = True
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible, float("-inf"))
    return s.softmax(-1) @ v


def _inputs(B, H, S, L, d, halo, shared, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = S * L

    def r(*shape):
        # SDPA-style layout: (B, H, T, d) views of (B, T, H, d) memory
        t = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g, dtype=dtype)
        return t.transpose(1, 2).requires_grad_()

    q, k = r(B, H, T, d), r(B, H, T, d)
    v = k if shared else r(B, H, T, d)
    hal = None
    if halo:
        kp = r(B, H, L, d)
        hal = (kp, kp if shared else r(B, H, L, d))
    return q, k, v, hal


CASES = [
    # B, H, S, L, d, halo, shared
    (1, 2, 5, 4, 8, False, False),
    (3, 2, 4, 8, 4, False, False),
    (2, 1, 1, 6, 8, False, False),   # a single segment: causal only
    (2, 3, 3, 5, 4, False, True),    # shared keys/values, odd sizes
    (2, 2, 3, 4, 8, True, False),    # sequence-parallel halo
    (1, 2, 1, 4, 8, True, True),     # halo, one segment, shared
]


@pytest.mark.parametrize("impl", ["cpu", "sdpa"])
@pytest.mark.parametrize("B,H,S,L,d,halo,shared", CASES)
def test_pair_attention_matches_dense_rule(impl, B, H, S, L, d, halo, shared):
    fn = pa.pair_attention_cpu if impl == "cpu" else pa.pair_attention_sdpa
    q, k, v, hal = _inputs(B, H, S, L, d, halo, shared)
    leaves = [q, k] + ([] if shared else [v]) + (
        [] if hal is None else [hal[0]] + ([] if shared else [hal[1]]))
    out = fn(q, k, v, L, d ** -0.5, halo=hal)
    assert out.shape == q.shape
    ref = _dense_reference(q, k, v, L, hal)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)

    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, leaves, go)
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    for name, a, b in zip("qkvhw", grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def test_dispatcher_uses_the_cpu_kernel_where_it_applies():
    q, k, v, _ = _inputs(1, 2, 3, 4, 8, False, False)
    assert pa._cpu_kernel_works(), "torch 2.13 CPU flash kernel must take the strided windows"
    assert pa._cpu_kernel_applies(q, k, v, 0.0)
    assert not pa._cpu_kernel_applies(q, k, v, 0.1)  # dropout: the SDPA path
    assert not pa._cpu_kernel_applies(q.double(), k.double(), v.double(), 0.0)


def test_bf16_cpu_kernel_agrees_with_sdpa_path():
    q, k, v, _ = _inputs(2, 2, 4, 8, 8, False, False, dtype=torch.bfloat16)
    a = pa.pair_attention_cpu(q, k, v, 8, 8 ** -0.5)
    b = pa.pair_attention_sdpa(q, k, v, 8, 8 ** -0.5)
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_length_not_a_multiple_of_segment_len_is_refused():
    q, k, v, _ = _inputs(1, 1, 2, 4, 4, False, False)
    with pytest.raises(ValueError, match="not a multiple of segment_len 3"):
        pa.pair_attention(q, k, v, 3, 0.5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast_bf16", "float64_default"])
def test_kernel_probe_is_independent_of_the_first_callers_mode(monkeypatch, mode):
    """The one-time probe once ran under the first caller's no_grad (a generation or eval
    call), failed there, and switched the fast path off for the whole process."""
    import contextlib

    monkeypatch.setattr(pa, "_PROBE", {})
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
           "autocast_bf16": torch.autocast("cpu", dtype=torch.bfloat16),
           "float64_default": contextlib.nullcontext()}[mode]
    if mode == "float64_default":
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
    try:
        with ctx:
            q, k, v, _ = _inputs(1, 2, 3, 4, 8, False, False)
            assert pa._cpu_kernel_applies(q.detach(), k.detach(), v.detach(), 0.0)
    finally:
        if mode == "float64_default":
            torch.set_default_dtype(old)
    assert pa._PROBE == {"ok": True}
