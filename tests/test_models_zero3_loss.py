"""The chunked training loss under DeepSpeed ZeRO-3 (real engine, 2 gloo ranks): the head's
weight is partitioned, gathered by ZeRO-3's module hooks when ``lm_head`` runs in the forward and
again in the backward recomputation of each chunk. The losses and the updated weights after two
SGD steps equal the same ZeRO-3 training with the unchunked loss (tied head, checkpointed
blocks, the Llama set), and the first loss equals a plain single-process forward."""
from __future__ import annotations

import pytest
import torch

from test_sequence_parallel_halo import run_ranks

MODEL = dict(variant="llp", vocab_size=40, d_model=16, n_heads=4, n_layers=2, seq_len=16,
             segment_len=4)
# tied head (its weight is also the embedding's), block checkpointing, the Llama set
CASES = [dict(loss_chunk_len=7, tie_embeddings=True, checkpoint_activations=True, n_kv_heads=2,
              norm="rmsnorm", mlp="swiglu", bias=False)]
LR, STEPS = 0.5, 2


def _tokens(step):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randint(0, MODEL["vocab_size"], (2, MODEL["seq_len"] + 1), generator=g)


def _plain_first_loss(case):
    from llp_pretrain.models import build_model, lm_loss

    torch.manual_seed(0)
    model = build_model(dict(MODEL, **dict(case, loss_chunk_len=0))).train()
    return lm_loss(model, _tokens(0))[0].item()


def _zero3_worker(rank, world, cases):
    import deepspeed

    from llp_pretrain.models import build_model, lm_loss

    out = []
    for case in [dict(c, loss_chunk_len=chunk) for c in cases
                 for chunk in (c["loss_chunk_len"], 0)]:
        torch.manual_seed(0)
        model = build_model(dict(MODEL, **case)).train()
        heads = []
        model.lm_head.register_forward_hook(lambda m, i, o: heads.append(tuple(o.shape)))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        losses = []
        for s in range(STEPS):
            loss_sum, n = lm_loss(engine, _tokens(s))  # both ranks: the same samples
            engine.backward(loss_sum / n)
            engine.step()
            losses.append(loss_sum.item())
        weights = {}
        for name, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                weights[name] = p.detach().clone()
        out.append(dict(losses=losses, weights=weights, heads=heads))
    return out


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_chunked_loss_under_zero3_equals_plain_unchunked_training(tmp_path):
    results = run_ranks(_zero3_worker, 2, args=(CASES,), timeout=200, tmp=tmp_path)
    for r_rank in results:
        for i, case in enumerate(CASES):
            chunked, whole = r_rank[2 * i], r_rank[2 * i + 1]
            C = case["loss_chunk_len"]
            assert chunked["losses"][0] == pytest.approx(_plain_first_loss(case), rel=1e-6)
            torch.testing.assert_close(torch.tensor(chunked["losses"]),
                                       torch.tensor(whole["losses"]), rtol=1e-6, atol=1e-5)
            # forward (chunks of <= C of the 32 rows) and its recomputation, every step
            assert all(rows <= C for rows, _ in chunked["heads"]), chunked["heads"]
            assert len(chunked["heads"]) == STEPS * 2 * -(-32 // C)
            assert [rows for rows, _ in whole["heads"]] == [32] * STEPS
            for name, w in chunked["weights"].items():
                torch.testing.assert_close(w, whole["weights"][name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name: f"{case} {name}: {m}")
