"""End to end through ``llp_pretrain.engine.train``: 2 processes as sequence-parallel 2 (one
data-parallel replica, so the data stream is the one a single process reads) with ZeRO-3 and
activation checkpointing train, evaluate and checkpoint; the saved weights, last training loss
and validation loss equal a 1-process run of the same config.
"""
from __future__ import annotations

import pytest

from launch_fixtures import REPO, final_weights, write_tiny_run
from test_sequence_parallel_halo import run_ranks


def _train_worker(rank, world, cfg_path, overrides):
    from llp_pretrain.config import load_config
    from llp_pretrain.engine import train

    cfg = load_config(cfg_path, overrides, world_size=world)
    res = train(cfg)
    return dict(loss=res.loss, val=res.val, step=res.step)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_engine_train_sp2_equals_one_process(tmp_path):
    cfg = write_tiny_run(tmp_path, max_steps=3, extra={
        "model.checkpoint_activations": True,
        "train.global_batch_size": 2,
        "deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.json"),
    })
    sp_run, one_run = tmp_path / "run_sp2", tmp_path / "run_1"
    sp = run_ranks(_train_worker, 2, timeout=240, tmp=tmp_path / "out_sp2",
                   args=(str(cfg), ["parallel.sequence_parallel_size=2",
                                    f"run.output_dir={sp_run}"]))
    one = run_ranks(_train_worker, 1, timeout=240, tmp=tmp_path / "out_1",
                    args=(str(cfg), [f"run.output_dir={one_run}"]))
    assert sp[0]["step"] == one[0]["step"] == 3
    for r in sp:
        assert r["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
        assert r["val"]["loss"] == pytest.approx(one[0]["val"]["loss"], rel=1e-5)
    w_sp, w_one = final_weights(sp_run), final_weights(one_run)
    assert set(w_sp) == set(w_one) and w_one
    for name, w in w_one.items():
        assert (w_sp[name].float() - w.float()).abs().max().item() < 2e-5, name
