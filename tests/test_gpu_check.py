"""benchmarks/gpu_check.sh runs end to end at toy size on a CPU (so the GPU check cannot rot)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_gpu_check_toy_size_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(LLP_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--toy", "--nproc", "1", "--workdir",
                        str(tmp_path), "--out", str(tmp_path / "res.json")],
                       env=env, capture_output=True, text=True, timeout=880)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["toy"] and res["zero_stage"] == 2 and res["precision"] == "bf16"
    assert res["tokens_per_sec"] > 0 and 0 < res["mfu"] <= 1.0 and res["peak_memory_gb"] > 0
    assert any("scaled_dot_product" in k for k in res["sdpa_kernels"]), res["sdpa_kernels"]
