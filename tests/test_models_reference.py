"""Reference mode: golden fixtures of the authors' code, and a naive re-implementation of the
reference math (dense, loop-based, float64) for randomized hyper-parameters."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llp_pretrain.models import from_reference_state_dict

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
GOLDEN = SHARED / "fixtures" / "reference_golden"
REF_VARIANTS = ["perceiver_ar", "history_self_attention", "compressed_history",
                "segmented_history", "llp"]


def _load_fixture(variant):
    meta = json.loads((GOLDEN / "meta.json").read_text())
    z = np.load(GOLDEN / f"{variant}.npz")
    state = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    return meta[variant], state, torch.as_tensor(z["tokens"]), torch.as_tensor(z["logits"])


@pytest.mark.parametrize("variant", REF_VARIANTS)
def test_golden_fixture_logits(variant):
    meta, state, tokens, ref = _load_fixture(variant)
    assert set(state) == set(meta["params"])
    model = from_reference_state_dict(variant, state, meta["hyper"])
    with torch.no_grad():
        out = model(tokens)
        every = model(tokens, return_all=True)
    m = out.shape[1]
    # trained positions (latents for the PerceiverAR family, all N for llp)
    sl = model.trained_positions(tokens.shape[1])
    assert m == sl.stop - sl.start
    torch.testing.assert_close(out, ref[:, ref.shape[1] - m:], rtol=0, atol=1e-5)
    # every row the reference outputs (history rows included)
    torch.testing.assert_close(every, ref, rtol=0, atol=1e-5)


def test_reference_state_mismatch_is_named():
    meta, state, _, _ = _load_fixture("llp")
    bad = dict(state)
    bad.pop("layers.1.0.fn.to_q.weight")
    bad["layers.9.0.fn.extra"] = np.zeros(3)
    with pytest.raises(KeyError, match=r"layers\.1\.0\.fn\.to_q\.weight.*layers\.9\.0\.fn\.extra"):
        from_reference_state_dict("llp", bad, meta["hyper"])
    wrong = dict(state)
    wrong["to_logits.1.bias"] = np.zeros(7, dtype=np.float32)
    with pytest.raises(ValueError, match="to_logits.1.bias"):
        from_reference_state_dict("llp", wrong, meta["hyper"])


# ----------------------------------------------------------------------------------------
# Naive re-implementation of the reference math (ARCHITECTURES.md + reference quirks):
# explicit loops over batch, heads and query rows, a visibility predicate per variant,
# float64 throughout. Written independently of llp_pretrain.models.
# ----------------------------------------------------------------------------------------

def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _rope_rows(t, positions, freqs):
    """t: (T, d); rotate pair (2i, 2i+1) of row r by positions[r] * freqs[i]."""
    out = t.clone()
    for r, p in enumerate(positions):
        for i in range(len(freqs)):
            a = float(p) * float(freqs[i])
            x0, x1 = t[r, 2 * i], t[r, 2 * i + 1]
            out[r, 2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
            out[r, 2 * i + 1] = x1 * math.cos(a) + x0 * math.sin(a)
    return out


def _attention_rows(q, kv_keys, kv_vals, visible, scale):
    """q: (Tq, d), keys/values: (Tk, d); visible(i, j) -> bool. Dense loop."""
    Tq = q.shape[0]
    out = torch.zeros(Tq, kv_vals.shape[1], dtype=q.dtype)
    for i in range(Tq):
        cols = [j for j in range(kv_keys.shape[0]) if visible(i, j)]
        assert cols, "every query must see at least one key"
        s = torch.stack([(q[i] * scale) @ kv_keys[j] for j in cols])
        p = torch.softmax(s, 0)
        out[i] = sum(p[n] * kv_vals[j] for n, j in enumerate(cols))
    return out


def naive_reference_logits(variant, P, hyper, tokens):
    """All output rows (B, T_out, V) of the reference model with parameters P (float64)."""
    D, H, NL = hyper["dim"], hyper["heads"], hyper["num_layers"]
    N = hyper["sequence_len"]
    d = D // H
    scale = d ** -0.5
    m = hyper.get("latent_len")
    h = N - m if m is not None else None
    B = tokens.shape[0]
    results = []
    for b in range(B):
        x = P["token_emb.weight"][tokens[b]]  # (N, D)
        for li in range(NL):
            pre = f"layers.{li}.0"
            xn = _ln(x, P[f"{pre}.norm.weight"], P[f"{pre}.norm.bias"])
            T = xn.shape[0]
            # row layout of this layer's input
            if variant == "perceiver_ar":
                pos = list(range(N)) if li == 0 else list(range(h, N))
                q_rows = list(range(h, N)) if li == 0 else list(range(T))
            elif variant == "compressed_history" and li > 0:
                c = hyper["compression_size"]
                pos = None  # no RoPE after layer 0
                q_rows = list(range(T))
            else:
                pos = list(range(T))
                q_rows = list(range(T))
            use_rope = (variant == "history_self_attention") or li == 0
            Q = xn @ P[f"{pre}.fn.to_q.weight"].T
            KV = xn @ P[f"{pre}.fn.to_kv.weight"].T
            heads_out = []
            for hh in range(H):
                qh = Q[:, hh * d:(hh + 1) * d]
                kh = KV[:, hh * d:(hh + 1) * d]
                if use_rope:
                    freqs = P[f"{pre}.fn.pos_emb.freqs"]
                    qh = _rope_rows(qh, pos, freqs)
                    kh = _rope_rows(kh, pos, freqs)
                if variant != "llp":  # per-head LayerNorm on the (rotated) keys = values
                    kh = _ln(kh, P[f"{pre}.fn.norm.weight"], P[f"{pre}.fn.norm.bias"])
                qsel = qh[q_rows]
                if variant == "llp":
                    L = N // hyper["num_segments"]

                    def vis(i, j, L=L):
                        return j <= i and j // L >= i // L - 1
                elif variant == "perceiver_ar":
                    def vis(i, j, li=li):
                        gi = h + i
                        gj = j if li == 0 else h + j
                        return gj <= gi
                elif variant == "history_self_attention" or (
                        variant == "compressed_history" and li == 0):
                    def vis(i, j):
                        return j < h if i < h else j <= i
                elif variant == "compressed_history":
                    def vis(i, j, c=c):
                        return j < c if i < c else j <= i
                elif variant == "segmented_history":
                    seg = h // hyper["num_segments"]

                    def vis(i, j, seg=seg):
                        if i < h:
                            return j < h and j // seg == i // seg
                        return j <= i
                heads_out.append(_attention_rows(qsel, kh, kh, vis, scale))
            o = torch.cat(heads_out, dim=1)  # heads merged (rows, D)
            fn = f"{pre}.fn"
            if variant == "llp":
                L = N // hyper["num_segments"]
                a = torch.empty_like(o)
                a[:L] = o[:L] @ P[f"{fn}.to_out_0.weight"].T + P[f"{fn}.to_out_0.bias"]
                a[L:] = o[L:] @ P[f"{fn}.to_out.weight"].T + P[f"{fn}.to_out.bias"]
                x = x + a
            elif variant == "perceiver_ar":
                a = o @ P[f"{fn}.w_out.weight"].T + P[f"{fn}.w_out.bias"]
                x = (x[h:] if li == 0 else x) + a
            elif variant == "compressed_history":
                c = hyper["compression_size"]
                if li == 0:
                    Wp, bp = P[f"{fn}.projection_hist.weight"], P[f"{fn}.projection_hist.bias"]
                    hist = torch.stack([sum(Wp[k, j] * o[j] for j in range(h)) + bp[k]
                                        for k in range(c)])
                    o = torch.cat([hist, o[h:]], 0)
                a = o @ P[f"{fn}.w_out.weight"].T + P[f"{fn}.w_out.bias"]
                x = (x[:c + m] if li == 0 else x) + a  # the reference's residual quirk
            else:
                x = x + o @ P[f"{fn}.to_out.weight"].T + P[f"{fn}.to_out.bias"]
            pre1 = f"layers.{li}.1"
            xn = _ln(x, P[f"{pre1}.norm.weight"], P[f"{pre1}.norm.bias"])
            hid = _gelu(xn @ P[f"{pre1}.fn.net.0.weight"].T + P[f"{pre1}.fn.net.0.bias"])
            x = x + hid @ P[f"{pre1}.fn.net.3.weight"].T + P[f"{pre1}.fn.net.3.bias"]
        x = _ln(x, P["to_logits.0.weight"], P["to_logits.0.bias"])
        results.append(x @ P["to_logits.1.weight"].T + P["to_logits.1.bias"])
    return torch.stack(results)


def random_reference_state(variant, hyper, rng, theta):
    """Reference-named parameters (float64) for ``hyper``: shapes as the reference builds them."""
    V, D, H, NL, N = (hyper[k] for k in ("num_unique_tokens", "dim", "heads", "num_layers",
                                         "sequence_len"))
    d = D // H
    out = "w_out" if variant in ("perceiver_ar", "compressed_history") else "to_out"
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))

    def r(*shape, s=0.3, base=0.0):
        return base + s * torch.randn(*shape, generator=g, dtype=torch.float64)

    P = {"token_emb.weight": r(V, D, s=1.0)}
    for i in range(NL):
        f = f"layers.{i}.0.fn"
        P[f"{f}.norm.weight"], P[f"{f}.norm.bias"] = r(d, base=1.0), r(d, s=0.1)
        P[f"{f}.pos_emb.freqs"] = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        P[f"{f}.to_q.weight"], P[f"{f}.to_kv.weight"] = r(D, D), r(D, D)
        P[f"{f}.{out}.weight"], P[f"{f}.{out}.bias"] = r(D, D), r(D, s=0.1)
        if variant == "llp":
            P[f"{f}.to_out_0.weight"], P[f"{f}.to_out_0.bias"] = r(D, D), r(D, s=0.1)
        if variant == "compressed_history":
            h = N - hyper["latent_len"]
            c = hyper["compression_size"]
            P[f"{f}.projection_hist.weight"] = r(c, h, s=h ** -0.5)
            P[f"{f}.projection_hist.bias"] = r(c, s=0.1)
        P[f"layers.{i}.0.norm.weight"], P[f"layers.{i}.0.norm.bias"] = r(D, base=1.0), r(D, s=0.1)
        P[f"layers.{i}.1.norm.weight"], P[f"layers.{i}.1.norm.bias"] = r(D, base=1.0), r(D, s=0.1)
        P[f"layers.{i}.1.fn.net.0.weight"], P[f"layers.{i}.1.fn.net.0.bias"] = r(4 * D, D), r(4 * D)
        P[f"layers.{i}.1.fn.net.3.weight"], P[f"layers.{i}.1.fn.net.3.bias"] = r(D, 4 * D), r(D)
    P["to_logits.0.weight"], P["to_logits.0.bias"] = r(D, base=1.0), r(D, s=0.1)
    P["to_logits.1.weight"], P["to_logits.1.bias"] = r(V, D), r(V, s=0.1)
    return P


def random_hyper(variant, rng, trial):
    """Random sizes; trial 0/1 force head widths 4/6 (pairs matter), trial 2 the edge sizes
    (one segment / one history token / one latent)."""
    H = rng.choice([1, 2, 3])
    d = (4, 6, 2, rng.choice([2, 4, 6]))[trial % 4]
    hyper = dict(num_unique_tokens=rng.choice([7, 11, 19]), dim=H * d, heads=H,
                 num_layers=rng.choice([1, 2, 3]), ff_dropout=0.0, attn_dropout=0.0, batch=2)
    if variant == "llp":
        L = rng.choice([1, 2, 3, 5])
        S = 1 if trial == 2 else rng.choice([2, 3, 4])
        hyper.update(sequence_len=L * S, num_segments=S)
    else:
        m = 1 if trial == 2 else rng.choice([2, 3, 5])
        if variant == "segmented_history":
            k = 1 if trial == 2 else rng.choice([2, 3])
            h = k * rng.choice([1, 2, 3])
            hyper.update(num_segments=k)
        else:
            h = 1 if trial == 2 else rng.choice([2, 4, 7])
        hyper.update(sequence_len=h + m, latent_len=m)
        if variant == "compressed_history":
            hyper.update(compression_size=rng.randint(1, h))
    return hyper


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", REF_VARIANTS)
def test_reference_mode_matches_naive_math_random_hyper(variant):
    rng = random.Random(1234 + REF_VARIANTS.index(variant))
    for trial in range(4):
        hyper = random_hyper(variant, rng, trial)
        theta = rng.choice([10000.0, 500.0, 37.0])
        P = random_reference_state(variant, hyper, rng, theta)
        tokens = torch.randint(0, hyper["num_unique_tokens"], (2, hyper["sequence_len"]),
                               generator=torch.Generator().manual_seed(trial))
        want = naive_reference_logits(variant, P, hyper, tokens)
        model = from_reference_state_dict(variant, {k: v.numpy() for k, v in P.items()}, hyper)
        with torch.no_grad():
            got = model(tokens, return_all=True)
        assert got.shape == want.shape, hyper
        err = (got.double() - want).abs().max().item()
        assert err < 1e-5 * max(1.0, want.abs().max().item()), (hyper, err)
