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
    assert not pa._cpu_kernel_applies(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0)


def test_bf16_cpu_kernel_is_as_close_to_float64_as_the_sdpa_path():
    q, k, v, _ = _inputs(2, 2, 4, 8, 8, False, False, dtype=torch.bfloat16)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ref = _dense_reference(q, k, v, 8, None)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    errs = {}
    for name, fn in (("cpu", pa.pair_attention_cpu), ("sdpa", pa.pair_attention_sdpa)):
        out = fn(q, k, v, 8, 8 ** -0.5)
        grads = torch.autograd.grad(out, (q, k, v), go.to(out.dtype))
        errs[name] = [((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                      for a, b in zip((out, *grads), (ref, *ref_grads))]
    for e_cpu, e_sdpa in zip(errs["cpu"], errs["sdpa"]):
        assert e_cpu < 0.05 and e_cpu <= 1.5 * e_sdpa + 1e-3, errs


@pytest.mark.parametrize("fn", [pa.pair_attention, pa.pair_attention_cpu,
                                pa.pair_attention_sdpa])
def test_bad_shapes_are_refused_by_every_entry_point(fn):
    q, k, v, hal = _inputs(2, 2, 2, 4, 8, True, False)
    cases = [
        ((q, k, v, 3), "not a positive multiple of segment_len 3"),
        ((q, k, v, 0), "segment_len must be a positive int"),
        ((q, k[:, :, :4], v, 4), "one shape"),  # fewer keys than queries
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0], 4), "not a positive multiple"),
        ((q[0], k[0], v[0], 4), r"\(B, H, T, d\)"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(*args, 0.5)
    with pytest.raises(ValueError, match="halo keys/values must be"):
        fn(q, k, v, 4, 0.5, halo=(hal[0][:, :, :2], hal[1][:, :, :2]))


@pytest.mark.parametrize("impl", ["cpu", "sdpa"])
def test_halo_without_values_means_shared(impl):
    fn = pa.pair_attention_cpu if impl == "cpu" else pa.pair_attention_sdpa
    q, k, _, hal = _inputs(2, 2, 3, 4, 8, True, True)
    torch.testing.assert_close(fn(q, k, k, 4, 0.3, halo=(hal[0], None)),
                               fn(q, k, k, 4, 0.3, halo=(hal[0], hal[0])))


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


def test_first_llp_call_inside_activation_checkpointing_trains(monkeypatch):
    """The probe once ran autograd inside the first checkpointed block, so the checkpoint saw
    more saved tensors in the forward than in the recomputation and the first backward died
    with CheckpointError (the llp_350m/1.3b configs checkpoint by default)."""
    from llp_pretrain.models import ModelConfig, build_model, lm_loss

    monkeypatch.setattr(pa, "_PROBE", {})
    model = build_model(ModelConfig(variant="llp", vocab_size=37, n_layers=2, d_model=8,
                                    n_heads=2, seq_len=8, segment_len=4,
                                    checkpoint_activations=True)).train()
    loss, _ = lm_loss(model, torch.randint(0, 37, (2, 9)))
    loss.backward()
    assert pa._PROBE == {"ok": True}
    assert all(p.grad is not None for p in model.parameters())


def test_a_kernel_that_misreads_windows_falls_back_with_a_warning(monkeypatch):
    """A torch whose private kernel copies or misreads strided inputs must not be used."""
    real = pa._FLASH_CPU

    def misreading(q, k, v, *a, **kw):  # gets strided keys wrong, contiguous ones right
        return real(q, k if k.is_contiguous() else k.flip(2), v, *a, **kw)

    monkeypatch.setattr(pa, "_PROBE", {})
    monkeypatch.setattr(pa, "_FLASH_CPU", misreading)
    q, k, v, _ = _inputs(1, 2, 3, 4, 8, False, False)
    with pytest.warns(RuntimeWarning, match="public-SDPA path"):
        assert not pa._cpu_kernel_applies(q, k, v, 0.0)
    out = pa.pair_attention(q, k, v, 4, 8 ** -0.5)
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, 4, None),
                               atol=2e-6, rtol=1e-5)
