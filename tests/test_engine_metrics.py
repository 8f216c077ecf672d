"""MFU honesty (seconds, one process, no process group): the peak comes from the vendor table by
device name, and a logged MFU never exceeds 100%."""
from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import tiny_run_config, write_tiny_dataset

from llp_pretrain.config import load_config
from llp_pretrain.monitor import Monitor, known_peak_flops
from llp_pretrain.layout import ParallelLayout
from llp_pretrain.training.distributed import DistInfo
from llp_pretrain.training.metrics import MetricsLogger, StepOutcome
from llp_pretrain.training.peak import Peak


def test_peak_table_by_device_name():
    assert known_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert known_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert known_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert known_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert known_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12  # TF32 tensor cores
    assert known_peak_flops("NVIDIA L40S", torch.bfloat16) == 362e12
    assert known_peak_flops("NVIDIA L4", torch.bfloat16) == 121e12
    assert known_peak_flops("Some Future Accelerator", torch.bfloat16) is None


def _scalars(run, tag):
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_mfu_is_never_logged_above_one(tmp_path):
    write_tiny_dataset(tmp_path / "ds", seq_len=16, train_samples=[8], vocab_size=64)
    cfg = load_config(raw=tiny_run_config(tmp_path / "ds", tmp_path / "run", train={"max_steps": 3}))
    d = DistInfo(rank=0, local_rank=0, layout=ParallelLayout(world_size=1), device=torch.device("cpu"))
    mon = Monitor(tmp_path / "tb", rank=0)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    flops_tok = 1e6
    peak = Peak(2e9, "measured")
    log = MetricsLogger(cfg, d, mon, peak, flops_tok)
    # step 1: 4e9 FLOP/s achieved against a measured 2e9 peak: the peak in use becomes 4e9 (MFU 1.0)
    log.record(StepOutcome(loss=1.0, skipped=False, lr=1e-3, grad_norm=None, time=tokens_per_step * flops_tok / 4e9))
    log.log(1, StepOutcome(1.0, False, 1e-3, None), None, 0)
    # step 2: half of that rate: MFU 0.5 against the raised peak
    log.record(StepOutcome(loss=1.0, skipped=False, lr=1e-3, grad_norm=None, time=tokens_per_step * flops_tok / 2e9))
    log.log(2, StepOutcome(1.0, False, 1e-3, None), None, 0)
    mon.close()
    mfu = [v for _, v in _scalars(tmp_path / "tb", "train/mfu")]
    assert mfu == [1.0, 0.5]
    assert [v for _, v in _scalars(tmp_path / "tb", "train/peak_flops")] == [4e9, 4e9]
    assert peak.flops == 4e9
