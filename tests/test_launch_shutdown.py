"""Clean shutdown: a finished 2-process run under torchrun exits 0 every time (no rank aborting in a
destructor after the final checkpoint). The cheap version of ``scripts/shutdown_stress.py --runs 50``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_five_two_process_runs_in_a_row_exit_zero(tmp_path):
    out = tmp_path / "summary.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "shutdown_stress.py"), "--runs", "5",
                        "--workdir", str(tmp_path), "--out", str(out), "--timeout", "300"],
                       capture_output=True, text=True, timeout=880)
    assert out.is_file(), p.stdout[-2000:] + p.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["exit_codes"] == {"0": 5} and summary["aborts"] == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.returncode == 0
