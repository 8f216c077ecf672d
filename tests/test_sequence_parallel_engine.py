"""Sequence parallelism inside the DeepSpeed engine: 4 gloo processes as data-parallel 2 x
sequence-parallel 2 (ZeRO 0, 1, 2 and 3, the engine's optimizer, schedule, clipping and ``compute_loss``)
train 5 steps and end with the weights of a plain single-process PyTorch run on the same global
batches; the engine's data layout gives sequence-parallel peers identical samples and different
data-parallel groups different ones.
"""
from __future__ import annotations

import pytest
import torch

from test_sequence_parallel_halo import run_ranks

MODEL = dict(variant="llp", vocab_size=50, d_model=32, n_heads=4, n_layers=2, seq_len=32,
             segment_len=4, checkpoint_activations=True)
STEPS, GLOBAL_BATCH, MICRO = 5, 4, 2


def _raw_config(data_dir, out_dir, sp, micro, zero):
    return {
        "model": dict(MODEL),
        "data": {"path": str(data_dir), "num_workers": 0, "shuffle_buffer": 4},
        "train": {"max_steps": STEPS, "micro_batch_size": micro, "global_batch_size": GLOBAL_BATCH,
                  "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "weight_decay": 0.1,
                  "grad_clip": 0.5, "precision": "fp32", "seed": 11},
        "parallel": {"sequence_parallel_size": sp},
        "deepspeed": f"configs/deepspeed/zero{zero}.json",
        "run": {"output_dir": str(out_dir)},
    }


def _batches(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, MODEL["vocab_size"], (STEPS, GLOBAL_BATCH, MODEL["seq_len"] + 1),
                         generator=g)


def _dp_sp_worker(rank, world, data_dir, out_dir, stages):
    import deepspeed
    import torch.distributed as dist

    from llp_pretrain.config import load_config
    from llp_pretrain.data import TrainStream, train_sources
    from llp_pretrain.engine import (_make_optimizer, build_parallel_context, compute_loss,
                                     lr_at, setup_distributed)
    from llp_pretrain.models import build_model

    out = {}
    for zero in stages:  # one set of processes trains once per ZeRO stage (saves start-up time)
        cfg = load_config(raw=_raw_config(data_dir, out_dir, 2, MICRO, zero), world_size=world)
        d = setup_distributed(cfg.parallel.sequence_parallel_size)
        t = cfg.train
        if not out:
            # samples the engine's data layout hands this rank
            stream = TrainStream(train_sources(cfg), t.global_batch_size, t.micro_batch_size, d.dp_size, d.dp_rank, 0,
                                 t.seed, cfg.data.shuffle_buffer)
            it = iter(stream)
            out["keys"] = [k for _ in range(3) for k in next(it)["keys"]]
            out["dp_rank"], out["sp_rank"] = d.dp_rank, d.sp_rank

        # the engine's initialisation sequence (engine.train)
        torch.manual_seed(t.seed)
        model = build_model(cfg.model)
        sp = build_parallel_context(cfg, d)
        optimizer = _make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, t.lr, t.min_lr, t.warmup_steps, t.max_steps) / t.lr)
        model = sp.prepare_model(model, cfg.ds_config)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=cfg.ds_config,
                                               mpu=sp.mpu, dist_init_required=False)
        batches = _batches()
        losses, norms = [], []
        for s in range(STEPS):
            mine = batches[s, d.dp_rank * MICRO:(d.dp_rank + 1) * MICRO]
            loss, _, _ = compute_loss(engine, mine, sp)
            engine.backward(loss)
            if zero == 0:  # reduced gradients are in .grad; DeepSpeed does not report their norm
                norms.append(torch.stack([p.grad.norm() for p in engine.module.parameters()
                                          if p.grad is not None]).norm().item())
            engine.step()
            if zero != 0:
                norms.append(float(engine.get_global_grad_norm()))
            losses.append(loss.item())
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=zero == 3):
            weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        dist.barrier()
        out[zero] = dict(weights=weights, losses=losses, norms=norms,
                         layout=(engine.dp_world_size, engine.seq_dp_world_size,
                                 engine.sequence_parallel_size))
        engine.destroy()
    return out


def _reference(data_dir, out_dir):
    """Plain PyTorch, one process, whole global batch per step; the engine's optimizer and
    schedule; clipping as torch.nn.utils.clip_grad_norm_."""
    from llp_pretrain.config import load_config
    from llp_pretrain.engine import _make_optimizer, lr_at
    from llp_pretrain.models import build_model, lm_loss

    cfg = load_config(raw=_raw_config(data_dir, out_dir, 1, GLOBAL_BATCH, 2), world_size=1)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    model.train()
    opt = _make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, t.lr, t.min_lr, t.warmup_steps, t.max_steps) / t.lr)
    losses, norms = [], []
    for batch in _batches():
        loss_sum, n = lm_loss(model, batch)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item())
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, norms


STAGES = (0, 1, 2, 3)


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_dp2_sp2_matches_single_process(tmp_path):
    from tiny_runs import write_tiny_dataset

    data_dir = tmp_path / "data"
    write_tiny_dataset(data_dir, seq_len=MODEL["seq_len"], train_samples=[8, 8, 8, 8],
                       vocab_size=MODEL["vocab_size"])
    res = run_ranks(_dp_sp_worker, 4, args=(str(data_dir), str(tmp_path / "run"), STAGES),
                    timeout=400, tmp=tmp_path / "out")
    ref_w, ref_losses, ref_norms = _reference(str(data_dir), str(tmp_path / "ref"))
    init_w = _initial_weights(str(data_dir), str(tmp_path / "init"))

    # layout: SP peers are consecutive ranks
    assert [(r["dp_rank"], r["sp_rank"]) for r in res] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # data: sequence-parallel peers read identical samples, data-parallel groups different ones
    assert res[0]["keys"] == res[1]["keys"] and res[2]["keys"] == res[3]["keys"]
    assert not set(res[0]["keys"]) & set(res[2]["keys"])
    # training moved the weights
    assert max((ref_w[n] - p).abs().max().item() for n, p in init_w.items()) > 1e-3
    for zero in STAGES:
        rz = [r[zero] for r in res]
        # DeepSpeed sees data-parallel 2, sequence-data-parallel 4, sequence-parallel 2
        assert all(r["layout"] == (2, 4, 2) for r in rz), zero
        for s in range(STEPS):
            # the loss a rank reports is that of its data-parallel group's whole samples (equal
            # on SP peers); the mean over the two groups is the single-process global-batch loss
            assert rz[0]["losses"][s] == pytest.approx(rz[1]["losses"][s], rel=1e-6), zero
            mean = (rz[0]["losses"][s] + rz[2]["losses"][s]) / 2
            assert mean == pytest.approx(ref_losses[s], rel=1e-5), (zero, s)
            # gradient magnitude (Adam would hide a wrong scale in the weights): the global norm
            # of the reduced gradient before clipping equals the single-process one
            for r in rz:
                assert r["norms"][s] == pytest.approx(ref_norms[s], rel=1e-4), (zero, s)
        # same weights on every rank and as in one process
        for r in rz:
            for name, w in ref_w.items():
                err = (r["weights"][name] - w).abs().max().item()
                assert err < 2e-5, (zero, name, err)


def _initial_weights(data_dir, out_dir):
    from llp_pretrain.config import load_config
    from llp_pretrain.models import build_model

    cfg = load_config(raw=_raw_config(data_dir, out_dir, 1, GLOBAL_BATCH, 2), world_size=1)
    torch.manual_seed(cfg.train.seed)
    return {n: p.detach().clone() for n, p in build_model(cfg.model).named_parameters()}
