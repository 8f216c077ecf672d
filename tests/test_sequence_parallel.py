"""Sequence-parallel LLP with the real model: P = 2 and P = 4 gloo ranks reproduce the
single-process logits, loss and every parameter gradient (fp32, 1e-5), with and without
activation checkpointing, and move exactly one segment of keys/values per layer each way.
"""
from __future__ import annotations

import pytest
import torch

from test_sequence_parallel_halo import run_ranks

BASE = dict(variant="llp", vocab_size=50, d_model=32, n_heads=4, n_layers=3, seq_len=32,
            segment_len=4)
CONFIGS = [
    dict(),
    dict(checkpoint_activations=True),
    dict(shared_kv=True, separate_first_segment_proj=True, checkpoint_activations=True),
    dict(kv_layernorm=True, rope_layers="first", tie_embeddings=True),
    # the Llama-style set with grouped-query attention, chunked loss (2-4 chunks per rank)
    dict(norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=2, checkpoint_activations=True,
         loss_chunk_len=12),
    dict(norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=1, shared_kv=True),
]


def _model_worker(rank, world, configs, batch):
    import torch.distributed as dist

    from llp_pretrain.models import build_model, lm_loss
    from llp_pretrain.parallel import (
        CommCounter,
        initialize_sequence_parallel,
        local_chunk,
        sequence_parallel_lm_loss,
    )

    groups = initialize_sequence_parallel(world)
    out = []
    for i, extra in enumerate(configs):
        cfg = dict(BASE, **extra)
        torch.manual_seed(100 + i)
        model = build_model(cfg)
        model.train()
        g = torch.Generator().manual_seed(7 + i)
        tokens = torch.randint(0, cfg["vocab_size"], (batch, cfg["seq_len"] + 1), generator=g)
        # single-process reference over the whole samples
        ref_logits = model(tokens[:, :-1]).detach()
        ref_sum, ref_n = lm_loss(model, tokens)
        (ref_sum / ref_n).backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        # sequence parallel: logits of this rank's chunk
        chunk = local_chunk(tokens, groups.sp_rank, world, cfg["segment_len"])
        with torch.no_grad():
            logits = model(chunk.input_ids, seq_parallel=groups.context(chunk.position_offset))
        n = chunk.input_ids.shape[1]
        logits_err = (logits - ref_logits[:, rank * n:(rank + 1) * n]).abs().max().item()
        # loss and gradients
        counter = CommCounter()
        loss_sum, n_tok = sequence_parallel_lm_loss(model, tokens, groups, counter=counter)
        (loss_sum / n_tok).backward()
        grad_err = {}
        for name, p in model.named_parameters():
            gr = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(gr, group=groups.get_sequence_parallel_group())
            grad_err[name] = (gr - ref_grads[name]).abs().max().item()
        out.append(dict(
            logits_err=logits_err,
            loss=loss_sum.item(), ref_loss=ref_sum.item(), n_tok=n_tok, ref_n=ref_n,
            grad_err=grad_err,
            grad_scale=max(t.abs().max().item() for t in ref_grads.values()),
            **counter.summary(),
        ))
    return out


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_llp_sequence_parallel_matches_single_process(world, tmp_path):
    batch = 2
    results = run_ranks(_model_worker, world, args=(CONFIGS, batch), timeout=150, tmp=tmp_path)
    for rank, per_rank in enumerate(results):
        for extra, r in zip(CONFIGS, per_rank):
            tag = f"P={world} rank={rank} config={extra}"
            assert r["logits_err"] < 1e-5, tag
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), tag
            assert r["n_tok"] == r["ref_n"] == batch * BASE["seq_len"], tag
            assert set(r["grad_err"]) and all(
                e <= 1e-5 * max(1.0, r["grad_scale"]) for e in r["grad_err"].values()
            ), (tag, {k: e for k, e in r["grad_err"].items() if e > 1e-6})
            # elements per layer: 2 * segment_len * n_kv_heads * head_dim (half with shared K/V)
            # x batch, i.e. 2 L D Hkv / H
            kv = 1 if extra.get("shared_kv") else 2
            kv_width = BASE["d_model"] // BASE["n_heads"] * extra.get("n_kv_heads",
                                                                         BASE["n_heads"])
            per_layer = kv * BASE["segment_len"] * kv_width * batch
            layers = {i: per_layer for i in range(BASE["n_layers"])}
            first, last = rank == 0, rank == world - 1
            assert r["fwd_send"] == ({} if last else layers), tag
            assert r["fwd_recv"] == ({} if first else layers), tag
            assert r["bwd_send"] == ({} if first else layers), tag
            assert r["bwd_recv"] == ({} if last else layers), tag
            if not last:
                assert r["fwd_send_bytes"] == {i: 4 * per_layer for i in layers}, tag
