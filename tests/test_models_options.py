"""The base-LLM options (``norm``, ``mlp``, ``bias``, ``n_kv_heads``) in every variant: exact
causality, cached decoding against the full forward, grouped-query attention against the
equivalent multi-head model, FLOPs against torch's counter, parameter counts, and the shipped
Llama-style config. Sequence parallelism with these options: ``test_sequence_parallel.py``."""
import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from llp_pretrain.models import LATENT_VARIANTS, VARIANTS, ModelConfig, build_model
from llp_pretrain.models.flops import forward_flops_breakdown
from llp_pretrain.models.generation import decode_step, prefill
from test_models_causality import CASES, dependency, expected_causal
from test_models_core import cfg_for

LLAMA = dict(norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=1)
OPTION_SETS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "no_bias": dict(bias=False),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "llama": LLAMA,
    "llama_shared_kv": dict(LLAMA, shared_kv=True, kv_layernorm=True),
}


def make(variant, opts, dtype=torch.float64, **kw):
    base = dict(variant=variant, vocab_size=13, d_model=16, n_heads=2, n_layers=2)
    base.update(kw)
    base.update(opts)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**base)).to(dtype).eval()
    with torch.no_grad():  # larger weights so that every dependence is far from zero
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model


# one case per variant from the causality suite, plus LLP's one-token segments and padding
CAUSAL = [c for i, c in enumerate(CASES) if i in (0, 2, 4, 5, 6, 10, 13, 16)]


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("variant,kw,N", CAUSAL, ids=[f"{c[0]}-{c[2]}" for c in CAUSAL])
def test_outputs_depend_exactly_on_past_tokens(variant, kw, N, opts):
    model = make(variant, opts, **kw)
    ids = torch.randint(0, 13, (1, N), generator=torch.Generator().manual_seed(N))
    dep = dependency(model, ids)
    want = expected_causal(model, N, llp_layers=model.cfg.n_layers if variant == "llp" else None)
    assert torch.equal(dep, want), f"\n{dep.int()}\n!=\n{want.int()}"


def _cfg(variant, **kw):
    return cfg_for(variant, **{"n_heads": 4, **kw})  # 4 heads: room for 2- and 1-head K/V groups


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_grouped_query_model_equals_multi_head_model_with_repeated_kv(variant, shared_kv,
                                                                      n_kv_heads):
    """A GQA model gives the logits of the multi-head model whose key/value head ``h`` is the
    GQA model's head ``h // (H / Hkv)``: query heads map to key/value heads the same way in
    every attention (LLP pairs and segment 0, latents, history, segments, decode)."""
    gqa = build_model(_cfg(variant, n_kv_heads=n_kv_heads, shared_kv=shared_kv,
                           kv_layernorm=shared_kv)).double().eval()
    mha = build_model(_cfg(variant, shared_kv=shared_kv, kv_layernorm=shared_kv)).double().eval()
    G, d = 4 // n_kv_heads, 4
    state = {}
    for name, t in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "kv_proj.weight")):
            t = t.view(n_kv_heads, d, -1).repeat_interleave(G, dim=0).reshape(4 * d, -1)
        state[name] = t
    mha.load_state_dict(state)
    ids = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # RoPE runs in fp32 (vectorised tails round differently for different head counts);
        # a wrong head mapping differs by O(logits)
        torch.testing.assert_close(gqa(ids), mha(ids), rtol=1e-5, atol=1e-7)
    assert gqa.num_params() < mha.num_params()


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("variant", ["gpt", "llp"])
def test_cached_decoding_matches_full_forward_every_step(variant, opts):
    kw = dict(seq_len=16, n_layers=3, d_model=16)
    if variant == "llp":
        kw["segment_len"] = 4
    model = make(variant, opts, dtype=torch.float32, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.6)
    total = 30 if variant == "llp" else 16  # LLP beyond seq_len
    ids = torch.randint(0, 13, (2, total), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        logits, state = prefill(model, ids[:, :5])
        torch.testing.assert_close(logits, full[:, 4], atol=1e-4, rtol=0)
        for t in range(5, total):
            logits = decode_step(model, ids[:, t], state)
            torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=0)
    # the cache holds n_kv_heads heads
    cache = state.cache
    assert cache.k[0].shape[1] == model.cfg.kv_heads


@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_linear_part_matches_torch_flop_counter(variant, opts):
    cfg = _cfg(variant, **opts)
    model = build_model(cfg)
    fc = FlopCounterMode(display=False)
    with fc:
        model(torch.randint(0, 17, (1, 12)))
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    measured = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) + counts.get("aten.bmm", 0)
    assert forward_flops_breakdown(cfg, 12)["linear"] == measured


@pytest.mark.parametrize("D,r,hidden", [(16, 4, 40), (2048, 4, 5464), (4096, 4, 10920),
                                        (768, 4, 2048), (8, 1, 8), (12, 1, 8)])
def test_swiglu_hidden_width_matches_gelu_weights(D, r, hidden):
    cfg = ModelConfig(variant="gpt", vocab_size=5, d_model=D, n_heads=2, n_layers=1, seq_len=4,
                      mlp="swiglu", mlp_ratio=r)
    assert cfg.mlp_hidden == hidden and hidden % 8 == 0
    # three D x h matrices hold gelu's two D x rD within half a multiple of 8 per matrix
    assert abs(3 * hidden - 2 * r * D) <= 12


def test_parameters_of_the_options():
    D, V, h = 16, 17, 40
    plain = build_model(_cfg("llp", n_heads=2))
    llama = build_model(_cfg("llp", n_heads=2, **LLAMA))
    per_layer = (D  # rms norm
                 + D * D + 2 * D * (D // 2)  # q; k, v with one kv head of width 8
                 + D * D  # out_proj, no bias
                 + D  # rms norm
                 + D * 2 * h + h * D)  # swiglu
    assert llama.num_params() == V * D + 2 * per_layer + D + V * D
    assert not any(n.endswith("bias") for n, _ in llama.named_parameters())
    assert all(isinstance(m.attn_norm, torch.nn.RMSNorm) for m in llama.blocks)
    assert isinstance(llama.final_norm, torch.nn.RMSNorm)
    assert isinstance(plain.final_norm, torch.nn.LayerNorm)
    assert plain.lm_head.bias is not None and plain.blocks[0].mlp.fc1.bias is not None


def test_swiglu_and_rmsnorm_compute_their_definitions():
    model = build_model(_cfg("gpt", n_heads=2, norm="rmsnorm", mlp="swiglu")).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    mlp = model.blocks[0].mlp
    w1, b1 = mlp.fc1.weight, mlp.fc1.bias
    gate, up = x @ w1[:40].T + b1[:40], x @ w1[40:].T + b1[40:]
    want = (gate * torch.sigmoid(gate) * up) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), want)
    norm = model.blocks[0].attn_norm
    want = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)


@pytest.mark.parametrize("kw,fields", [
    (dict(n_heads=4, n_kv_heads=3), ["n_kv_heads", "n_heads"]),
    (dict(n_kv_heads=0), ["n_kv_heads"]),
    (dict(norm="batchnorm"), ["norm"]),
    (dict(mlp="relu"), ["mlp"]),
    (dict(loss_chunk_len=-1), ["loss_chunk_len"]),
])
def test_invalid_options_name_the_fields(kw, fields):
    with pytest.raises(ValidationError) as err:
        _cfg("llp", **kw)
    for f in fields:
        assert f in str(err.value)


def test_shipped_llama_config_builds_the_llama_set():
    from pathlib import Path

    from llp_pretrain.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "llp_1.3b_llama.yaml"
    run = load_config(str(path), world_size=64, check_data=False)  # the whole run config
    model_cfg = run.model
    assert (model_cfg.norm, model_cfg.mlp, model_cfg.bias) == ("rmsnorm", "swiglu", False)
    assert model_cfg.kv_heads < model_cfg.n_heads
    plain = model_cfg.model_copy(update=dict(norm="layernorm", mlp="gelu", bias=True,
                                             n_kv_heads=None))
    from llp_pretrain.models.flops import flops_per_token

    # GQA makes the Llama set cheaper per token than the plain set at the same width
    assert flops_per_token(model_cfg, model_cfg.seq_len) < flops_per_token(plain, plain.seq_len)
