"""Nodelist expansion, port derivation, hostfile parsing and world-layout validation (no training)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llp_pretrain.launch_utils import (
    LaunchError,
    LayoutError,
    expand_nodelist,
    extract_set_args,
    first_host,
    fit_data_workers,
    format_layout,
    master_port_from_job_id,
    parse_hostfile,
    read_layout_settings,
    resolve_layout,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("node-[001-002]", ["node-001", "node-002"]),
    ("single", ["single"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[1,3],y-[09-10],z", ["x1", "x3", "y-09", "y-10", "z"]),
    ("gpu-a100-[1-2].cluster", ["gpu-a100-1.cluster", "gpu-a100-2.cluster"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad, words", [
    ("", "empty nodelist"),
    ("gpu[01-03", "without a matching ']'"),
    ("gpu01]", "without a matching '['"),
    ("gpu[03-01]", "runs backwards"),
    ("gpu[a-b]", "bad range"),
    ("gpu[]", "empty brackets"),
    ("a,,b", "empty entry"),
])
def test_expand_nodelist_rejects_malformed(bad, words):
    with pytest.raises(LaunchError, match=words.replace("[", r"\[").replace("]", r"\]")):
        expand_nodelist(bad)


def _env_without_scontrol(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:/nonexistent"
    return env


def test_cli_expands_without_scontrol(tmp_path):
    env = _env_without_scontrol(tmp_path)
    out = subprocess.run([sys.executable, "-m", "llp_pretrain.launch_utils", "expand-nodelist", "gpu[01-03,07]"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out == ["gpu01", "gpu02", "gpu03", "gpu07"]
    # first-host falls back to the Python expander when scontrol is absent, and never to localhost
    out = subprocess.run([sys.executable, "-m", "llp_pretrain.launch_utils", "first-host", "node-[001-002]"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out == "node-001"
    bad = subprocess.run([sys.executable, "-m", "llp_pretrain.launch_utils", "first-host", ""],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "empty nodelist" in bad.stderr and "localhost" not in bad.stdout


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed: no cross-check with SLURM")
@pytest.mark.parametrize("nodelist", ["gpu[01-03,07]", "a1,b[2-3]", "node-[001-002]", "r[1-2]n[8-11]", "x[098-101]"])
def test_expander_agrees_with_scontrol(nodelist):
    ref = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert expand_nodelist(nodelist) == ref
    assert first_host(nodelist) == ref[0]


def test_master_port_from_job_id():
    assert master_port_from_job_id(0) == 15000
    assert master_port_from_job_id("123456") == 18456
    ports = {master_port_from_job_id(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(15000 <= p < 30000 for p in ports)
    assert master_port_from_job_id(7, base=20000, span=100) == 20007
    with pytest.raises(LaunchError, match="not a number"):
        master_port_from_job_id("12_3")


def test_parse_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\nnode01 slots=8\n\nnode02 slots=8  # second\n")
    assert parse_hostfile(hf) == [("node01", 8), ("node02", 8)]
    hf.write_text("node01 slots=8\nnode02 slot=8\n")
    with pytest.raises(LaunchError, match=r"hosts:2: expected 'HOSTNAME slots=N'"):
        parse_hostfile(hf)
    hf.write_text("node01 slots=8\nnode01 slots=8\n")
    with pytest.raises(LaunchError, match=r"hosts:2: host node01 is listed twice \(first on line 1\)"):
        parse_hostfile(hf)
    hf.write_text("# nothing\n")
    with pytest.raises(LaunchError, match="lists no hosts"):
        parse_hostfile(hf)
    assert parse_hostfile(REPO / "launch" / "hostfile.example")  # the shipped example parses


def test_resolve_layout_two_nodes_eight_gpus():
    lay = resolve_layout(2, 8, 2, hosts=["gpu01", "gpu02"], master_addr="gpu01", master_port=15042,
                         global_batch_size=64, micro_batch_size=4)
    assert (lay.world_size, lay.data_parallel_size) == (16, 8)
    assert list(lay.node_ranks(1)) == list(range(8, 16))
    text = format_layout(lay, "slurm/torchrun")
    assert "nodes=2 nproc_per_node=8 world_size=16 data_parallel_size=8 sequence_parallel_size=2" in text
    assert "node 1 (gpu02): ranks 8-15" in text and "gpu01:15042" in text
    assert "grad_accum_steps=2" in text
    assert "sequence-parallel groups (consecutive ranks): [0-1] [2-3] [4-5] [6-7] ..." in text
    assert "warning" not in text
    assert "some groups span two nodes" in format_layout(resolve_layout(2, 3, 2))


@pytest.mark.parametrize("args, words", [
    (dict(nnodes=1, nproc_per_node=3, sequence_parallel_size=2), "world_size=3 .* not divisible by parallel.sequence_parallel_size=2"),
    (dict(nnodes=1, nproc_per_node=2, sequence_parallel_size=4), "too few processes .* world_size=2 .* parallel.sequence_parallel_size=4"),
    (dict(nnodes=2, nproc_per_node=2, sequence_parallel_size=1, global_batch_size=6, micro_batch_size=2),
     "global_batch_size=6 is not a positive multiple of train.micro_batch_size=2 x data_parallel_size=4"),
    (dict(nnodes=1, nproc_per_node=2, sequence_parallel_size=1, global_batch_size=8, micro_batch_size=2,
          grad_accum_steps=1), "global_batch_size=8 != .*set train.global_batch_size=4"),
    (dict(nnodes=2, nproc_per_node=1, sequence_parallel_size=1, hosts=["a"]), "1 hosts .* nnodes=2"),
])
def test_resolve_layout_rejects(args, words):
    with pytest.raises(LayoutError, match=words):
        resolve_layout(**args)


def test_read_layout_settings_applies_set_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("parallel:\n  sequence_parallel_size: 2\ntrain:\n  micro_batch_size: 2\n")
    train_args = ["--set", "train.global_batch_size=8", "--resume", "auto", "--set=parallel.sequence_parallel_size=4"]
    assert extract_set_args(train_args) == ["train.global_batch_size=8", "parallel.sequence_parallel_size=4"]
    s = read_layout_settings(cfg, extract_set_args(train_args))
    assert s == {"sequence_parallel_size": 4, "num_workers": None, "global_batch_size": 8, "micro_batch_size": 2, "grad_accum_steps": None}
    cfg.write_text("parallel:\n  sequence_parallel_size: two\n")
    with pytest.raises(LaunchError, match="parallel.sequence_parallel_size must be an integer"):
        read_layout_settings(cfg)
    with pytest.raises(LaunchError, match="missing.yaml.* not found"):
        read_layout_settings(tmp_path / "missing.yaml")


def test_fit_data_workers():
    assert fit_data_workers(4, 8) == 4          # fits: unchanged
    assert fit_data_workers(16, 8) == 7         # lowered to CPUs per process - 1
    assert fit_data_workers(None, 1) == 0       # default 1 worker does not fit one CPU
    assert fit_data_workers(0, 64) == 0         # never raised
    with pytest.raises(LaunchError, match="at least 1"):
        fit_data_workers(2, 0)


def test_fit_workers_cli_reads_config_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  num_workers: 6\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "llp_pretrain.launch_utils", "fit-workers", "--config",
                                     str(cfg), *a], capture_output=True, text=True, timeout=60, check=True)
    assert run("--cpus-per-process", "4").stdout.strip() == "3"
    assert run("--cpus-per-process", "16").stdout.strip() == "6"
    assert run("--cpus-per-process", "16", "--", "--set", "data.num_workers=2").stdout.strip() == "2"


def test_launchers_read_the_yaml_with_the_training_loader(tmp_path, capsys):
    """Duplicate keys, malformed --set items and a directory given as --config are refused by the
    launchers exactly as by the training CLI (llp_pretrain.config.read_run_config): every problem,
    exit status 2, no traceback."""
    from llp_pretrain.launch_utils import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("parallel:\n  sequence_parallel_size: 2\n  sequence_parallel_size: 4\n"
                   "train:\n  micro_batch_size: 2\n  micro_batch_size: 3\n")
    for argv in (["layout", "--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "4", "--no-config-check",
                  "--", "--set", "train.lr"],
                 ["fit-workers", "--config", str(cfg), "--cpus-per-process", "4", "--", "--set", "train.lr"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "line 3: not valid YAML: duplicate key 'sequence_parallel_size' (first given at line 2)" in err
        assert "line 6: not valid YAML: duplicate key 'micro_batch_size' (first given at line 5)" in err
        assert "--set train.lr: expected key.sub=value" in err
    assert main(["layout", "--config", str(tmp_path), "--nnodes", "1", "--nproc-per-node", "1"]) == 2
    assert f"[llp-launch] error: config '{tmp_path}' is a directory, not a run YAML file; give the file (it holds: " \
           "c.yaml)" in capsys.readouterr().err
