"""A data error raised inside a DataLoader worker ends training with a message, never a hang.

Reproduces a fault found by trying the stack as a new user: a truncated shard made the worker raise,
the trainer reported the error, and then waited for ever at interpreter exit on the worker (which
outlives SIGTERM so that SLURM preemption can checkpoint)."""
import subprocess
import sys

import pytest
import yaml

from tiny_runs import tiny_run_config, write_tiny_dataset


@pytest.mark.timeout(400)
def test_truncated_shard_read_by_a_worker_exits_with_error(tmp_path):
    ds = tmp_path / "ds"
    write_tiny_dataset(ds, seq_len=16, train_samples=[12, 12], vocab_size=50)
    shard = sorted(ds.glob("train-*.tar"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # the manifest still promises 12 samples
    raw = tiny_run_config(ds, tmp_path / "run", data={"num_workers": 1}, train={"max_steps": 40})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert shard.name in out, out[-3000:]
