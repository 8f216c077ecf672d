"""Halo exchange on its own: a minimal LLP attention stack split over 4 gloo ranks must give
the single-process outputs and gradients (incl. non-reentrant activation checkpointing and shared
K/V), and move exactly one segment of keys/values per layer each way.

The reference is computed in each worker on the whole sequence with the same weights (no
process groups involved), from the LLP definition in ARCHITECTURES.md section 6, written here
independently of llp_pretrain.models.
"""
from __future__ import annotations

import gc
import math
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llp_pretrain.parallel import (
    check_divisible,
    check_sequence_parallel_variant,
    local_chunk,
    ParallelLayout,
)
from llp_pretrain.training.distributed import free_port


# ----------------------------------------------------------------------------------------------
# process-group harness (shared with test_sequence_parallel.py)
def _entry(rank, world, port, fn, args, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, args=(), timeout: float = 90.0, tmp: Path = None):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; return their results.

    Fails (and kills the workers) if any worker raises or the whole group exceeds ``timeout``
    seconds, so a hang in a collective fails fast.
    """
    outdir = Path(tmp)
    outdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, str(outdir)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} with {world} ranks exceeded {timeout}s")
    except Exception as e:
        errs = "\n".join(p.read_text() for p in sorted(outdir.glob("*.err")))
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        raise AssertionError(f"{e}\n{errs}") from e
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------------------------
# a tiny LLP attention stack (ARCHITECTURES.md section 6), single process or sequence-parallel
def _llp_attention(q, k, v, L, k_halo=None, v_halo=None):
    """q: (B, H, n, d), k, v: (B, Hkv, n, d) for a chunk of whole segments; halo: (B, Hkv, L, d)
    or None. Key/value head j serves query heads j * H/Hkv .. (j + 1) * H/Hkv - 1."""
    B, H, n, d = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    if k_halo is not None:
        k_halo, v_halo = k_halo.repeat_interleave(G, 1), v_halo.repeat_interleave(G, 1)
    S = n // L
    outs = []
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for s in range(S):
        qs = q[:, :, s * L:(s + 1) * L]
        ks, vs = k[:, :, s * L:(s + 1) * L], v[:, :, s * L:(s + 1) * L]
        if s > 0:
            kp, vp = k[:, :, (s - 1) * L:s * L], v[:, :, (s - 1) * L:s * L]
        else:
            kp, vp = k_halo, v_halo
        if kp is not None:
            keys, vals = torch.cat([kp, ks], 2), torch.cat([vp, vs], 2)
            mask = torch.cat([torch.ones(L, L, dtype=torch.bool), causal], 1)
        else:
            keys, vals, mask = ks, vs, causal
        att = (qs @ keys.transpose(-1, -2)) / math.sqrt(d)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        outs.append(att @ vals)
    return torch.cat(outs, 2)


def _layer(x, w, L, H, shared_kv, sp):
    B, n, D = x.shape
    d = D // H
    h = torch.nn.functional.layer_norm(x, (D,))
    q = (h @ w["q"]).view(B, n, H, d).transpose(1, 2)
    k = (h @ w["k"]).view(B, n, -1, d).transpose(1, 2)  # Hkv = w["k"].shape[1] / d heads
    v = k if shared_kv else (h @ w["v"]).view(B, n, -1, d).transpose(1, 2)
    kh = vh = None
    if sp is not None:
        got = sp.exchange_halo(k[:, :, -L:], None if shared_kv else v[:, :, -L:])
        if got is not None:
            kh, vh = got
            if shared_kv:
                assert vh is None
                vh = kh
    a = _llp_attention(q, k, v, L, kh, vh)
    x = x + a.transpose(1, 2).reshape(B, n, D) @ w["o"]
    return x + torch.tanh(x @ w["m"])


def _stack(x, weights, L, H, shared_kv, sp=None, checkpoint=False):
    from torch.utils.checkpoint import checkpoint as ckpt

    for w in weights:
        if checkpoint:
            x = ckpt(_layer, x, w, L, H, shared_kv, sp, use_reentrant=False)
        else:
            x = _layer(x, w, L, H, shared_kv, sp)
    return x


def _make(seed, B, N, D, n_layers, Dkv=None):
    """Weights of the stack; k and v project to ``Dkv`` (``Hkv * d``, grouped-query) columns."""
    g = torch.Generator().manual_seed(seed)
    Dkv = Dkv or D
    weights = [
        {k: (torch.randn(D, Dkv if k in "kv" else D, generator=g) / math.sqrt(D)).requires_grad_()
         for k in "qkvom"}
        for _ in range(n_layers)
    ]
    x = torch.randn(B, N, D, generator=g)
    c = torch.randn(B, N, D, generator=g)
    return weights, x, c


def _grad(t):
    return t.grad.clone() if t.grad is not None else torch.zeros_like(t)


def _halo_worker(rank, world, cases):
    from llp_pretrain.parallel import initialize_sequence_parallel

    groups = initialize_sequence_parallel(world)
    results = []
    for case in cases:
        B, N, D, H, L, n_layers = case["B"], case["N"], case["D"], case["H"], case["L"], case["layers"]
        Dkv = D // H * case.get("Hkv", H)
        weights, x, c = _make(case["seed"], B, N, D, n_layers, Dkv)
        # single-process reference on the whole sequence
        xr = x.clone().requires_grad_()
        ref_out = _stack(xr, weights, L, H, case["shared_kv"])
        (ref_out * c).sum().backward()
        ref_grads = {f"{i}.{k}": _grad(w[k]) for i, w in enumerate(weights) for k in w}
        ref_xgrad = xr.grad.clone()
        for w in weights:
            for t in w.values():
                t.grad = None
        # sequence-parallel: this rank's chunk (garbage collector off: the context must be freed
        # by reference counting alone once the step's tensors are dropped, i.e. no reference
        # cycle through the autograd graph keeps cached segments alive)
        gc.disable()
        try:
            r, sp_ref = _sp_step(rank, world, groups, case, weights, x, c, ref_out, ref_xgrad,
                                 ref_grads)
            r["freed_without_gc"] = sp_ref() is None
        finally:
            gc.enable()
        results.append(r)
    return results


def _sp_step(rank, world, groups, case, weights, x, c, ref_out, ref_xgrad, ref_grads):
    import weakref

    import torch.distributed as dist

    from llp_pretrain.parallel import CommCounter

    N, H, L = case["N"], case["H"], case["L"]
    n = N // world
    sl = slice(rank * n, (rank + 1) * n)
    xl = x[:, sl].clone().requires_grad_()
    counter = CommCounter()
    sp = groups.context(position_offset=rank * n, counter=counter)
    out = _stack(xl, weights, L, H, case["shared_kv"], sp=sp, checkpoint=case["ckpt"])
    loss = sp.add_halo_terms((out * c[:, sl]).sum())
    loss.backward()
    grads = {}
    for i, w in enumerate(weights):
        for k, t in w.items():
            g = _grad(t)
            dist.all_reduce(g)  # replicated weights: sum over the sequence chunks
            grads[f"{i}.{k}"] = g
    return dict(
        out_err=(out.detach() - ref_out.detach()[:, sl]).abs().max().item(),
        xgrad_err=(xl.grad - ref_xgrad[:, sl]).abs().max().item(),
        grad_err={k: (grads[k] - ref_grads[k]).abs().max().item() for k in grads},
        grad_scale=max(g.abs().max().item() for g in ref_grads.values()),
        **counter.summary(),
        calls=sp.calls,
    ), weakref.ref(sp)


CASES = [
    dict(seed=1, B=2, N=32, D=16, H=2, L=4, layers=3, shared_kv=False, ckpt=False),
    dict(seed=2, B=2, N=32, D=16, H=2, L=4, layers=3, shared_kv=False, ckpt=True),
    dict(seed=3, B=1, N=32, D=16, H=4, L=8, layers=2, shared_kv=True, ckpt=True),
    # grouped-query attention: 2 key/value heads for 4 query heads, half the halo
    dict(seed=4, B=2, N=32, D=16, H=4, Hkv=2, L=4, layers=2, shared_kv=False, ckpt=True),
    dict(seed=5, B=1, N=32, D=16, H=4, Hkv=1, L=4, layers=2, shared_kv=True, ckpt=False),
]


def _check(results, world):
    for rank, per_rank in enumerate(results):
        for case, r in zip(CASES, per_rank):
            tag = f"rank {rank} case {case}"
            assert r["out_err"] < 1e-5, tag
            assert r["xgrad_err"] < 1e-5, tag
            for k, e in r["grad_err"].items():
                assert e < 1e-5 * max(1.0, r["grad_scale"]), (tag, k, e)
            # communication: one segment of keys (+ values) per layer, each direction:
            # 2 * B * L * Hkv * d elements (= 2 B L D Hkv / H; half with shared K/V)
            d = case["D"] // case["H"]
            per = (case["B"] * case["L"] * case.get("Hkv", case["H"]) * d
                   * (1 if case["shared_kv"] else 2))
            layers = set(range(case["layers"]))
            assert r["calls"] == case["layers"]
            if not case["ckpt"]:
                # (torch's non-reentrant checkpointing itself leaves reference cycles, with or
                # without sequence parallelism, so only the plain case can be checked)
                assert r["freed_without_gc"], tag
            has_next, has_prev = rank < world - 1, rank > 0
            assert r["fwd_send"] == ({i: per for i in layers} if has_next else {}), tag
            assert r["fwd_recv"] == ({i: per for i in layers} if has_prev else {}), tag
            assert r["bwd_send"] == ({i: per for i in layers} if has_prev else {}), tag
            assert r["bwd_recv"] == ({i: per for i in layers} if has_next else {}), tag
            if has_next:
                assert r["fwd_send_bytes"] == {i: 4 * per for i in layers}  # fp32


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [4])  # first, middle and last ranks; P=2 runs with the model
def test_halo_exchange_matches_single_process(world, tmp_path):
    results = run_ranks(_halo_worker, world, args=(CASES,), timeout=120, tmp=tmp_path)
    _check(results, world)


# ----------------------------------------------------------------------------------------------
# pure functions: topology, chunking, validation
def test_topology_sp_peers_are_consecutive():
    layout = ParallelLayout(world_size=8, sp_size=2)
    t = layout.coords(5)
    assert (t.sp_rank, t.dp_rank, layout.dp_size) == (1, 2, 4)
    assert t.sp_ranks == (4, 5) and t.dp_ranks == (1, 3, 5, 7)
    assert layout.sp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.dp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="not divisible by parallel.sequence_parallel_size=3"):
        ParallelLayout(8, 3)
    with pytest.raises(ValueError, match="too few processes"):
        ParallelLayout(2, 4)
    with pytest.raises(ValueError, match=r"rank 8 is outside \[0, 8\)"):
        layout.coords(8)


def test_local_chunks_cover_every_position_once():
    tokens = torch.arange(2 * 33).view(2, 33)
    chunks = [local_chunk(tokens, r, 4, 4) for r in range(4)]
    assert torch.equal(torch.cat([c.input_ids for c in chunks], 1), tokens[:, :32])
    assert torch.equal(torch.cat([c.targets for c in chunks], 1), tokens[:, 1:])
    assert [c.position_offset for c in chunks] == [0, 8, 16, 24]
    with pytest.raises(ValueError, match="seq_len=32 is not divisible"):
        check_divisible(32, 4, 16)


def test_non_llp_variant_refuses_sequence_parallel():
    check_sequence_parallel_variant("gpt", 1)
    with pytest.raises(ValueError, match="needs model.variant 'llp'"):
        check_sequence_parallel_variant("perceiver_ar", 2)
