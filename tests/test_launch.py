"""launch/train.sh and launch/multinode.sh with real processes on CPU (gloo).

* two "nodes" on loopback (multinode.sh twice, node rank 0 and 1, one process each) train a tiny
  LLP and end with the same weights as one node with two processes (train.sh --nproc 2);
* wrong layouts are refused before any training process starts;
* the hostfile fan-out and the deepspeed launcher form a real gloo group (rendezvous probe).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch_fixtures import REPO, checkpoint_steps, event_files, final_weights, launch_env, tensorboard_steps, \
    write_tiny_run

from llp_pretrain.training.distributed import free_port as _free_port

TRAIN_SH = str(REPO / "launch" / "train.sh")
MULTINODE_SH = str(REPO / "launch" / "multinode.sh")
PROBE_CMD = f"{sys.executable} {REPO / 'tests' / 'launch_probe.py'} train"



def _start(cmd, env, log: Path):
    f = open(log, "w")
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO), f


def _finish(procs, timeout):
    """Wait for every process; on timeout kill all their process groups. Returns exit codes."""
    codes = []
    try:
        for p, f in procs:
            codes.append(p.wait(timeout=timeout))
    finally:
        for p, f in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            f.close()
    return codes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return root, write_tiny_run(root, max_steps=5)


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_two_loopback_nodes_match_one_node_two_processes(tiny):
    root, cfg = tiny
    env = launch_env()
    one, two = root / "one_node", root / "two_nodes"

    # one node, two processes (torchrun through train.sh)
    (p,) = [_start([TRAIN_SH, str(cfg), "--nproc", "2", "--", "--set", f"run.output_dir={one}"], env,
                   root / "one_node.log")]
    assert _finish([p], 200) == [0], (root / "one_node.log").read_text()[-3000:]

    # two nodes on loopback, one process each; node 1 starts first (it waits for the master)
    port = _free_port()
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1"]
    tail = ["--", "--set", f"run.output_dir={two}"]
    n1 = _start([MULTINODE_SH, str(cfg), *common, "--node-rank", "1", *tail], env, root / "node1.log")
    n0 = _start([MULTINODE_SH, str(cfg), *common, "--node-rank", "0", *tail], env, root / "node0.log")
    codes = _finish([n0, n1], 200)
    logs = {n: (root / f"{n}.log").read_text() for n in ("node0", "node1")}
    assert codes == [0, 0], "\n".join(v[-3000:] for v in logs.values())

    # each launcher printed its world layout
    assert "world_size=2 data_parallel_size=2 sequence_parallel_size=1" in logs["node0"]
    assert "node 1 (" in logs["node1"] and "ranks 1-1 <- this node" in logs["node1"]

    assert checkpoint_steps(one) == [5] and checkpoint_steps(two) == [5]
    w1, w2 = final_weights(one), final_weights(two)
    assert w1.keys() == w2.keys() and len(w1) > 0
    init = None
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-6), (k, (w1[k] - w2[k]).abs().max().item())
    # training moved the weights (the comparison is not between two untouched initialisations)
    assert any(not torch.equal(w1[k], w1[k].clone().zero_()) for k in w1)

    # only rank 0 wrote TensorBoard: one event file, each step once
    for run in (one, two):
        assert len(event_files(run / "tensorboard")) == 1, event_files(run)
        assert tensorboard_steps(run) == [1, 2, 3, 4, 5]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_wrong_layouts_fail_before_training(tiny, tmp_path):
    root, cfg = tiny
    env = launch_env()
    out = tmp_path / "never"
    # world 3 is not divisible by sequence_parallel_size 2
    r = subprocess.run([TRAIN_SH, str(cfg), "--nproc", "3", "--", "--set", "parallel.sequence_parallel_size=2",
                        "--set", f"run.output_dir={out}"], env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 2
    assert "world_size=3 (1 node(s) x 3 process(es)) is not divisible by parallel.sequence_parallel_size=2" in r.stderr
    # too few processes for the sequence-parallel size, across two nodes
    r = subprocess.run([MULTINODE_SH, str(cfg), "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.9.9.9",
                        "--nproc-per-node", "1", "--", "--set", "parallel.sequence_parallel_size=4"],
                       env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 2 and "too few processes" in r.stderr and "world_size=2" in r.stderr
    # a global batch the data-parallel size cannot reach
    r = subprocess.run([TRAIN_SH, str(cfg), "--nproc", "3", "--", "--set", f"run.output_dir={out}"],
                       env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 2 and "global_batch_size=4 is not a positive multiple" in r.stderr
    # node rank 0 must run on the master address
    r = subprocess.run([MULTINODE_SH, str(cfg), "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.9.9.9"],
                       env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 2 and "is not this machine" in r.stderr
    # hostfile with a host we cannot ssh to: stops before starting anything, says what to do
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-unreachable-x slots=1\nlocalhost slots=1\n")
    r = subprocess.run([MULTINODE_SH, str(cfg), "--hostfile", str(hostfile), "--", "--set", f"run.output_dir={out}"],
                       env={**env, "LLP_SSH": "false", "LLP_SKIP_CONFIG_CHECK": "1"}, capture_output=True, text=True,
                       timeout=100)
    assert r.returncode == 2 and "cannot ssh to node-unreachable-x without a password" in r.stderr
    assert "--node-rank" in r.stderr                       # the alternative: start each node by hand
    assert not out.exists()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_hostfile_fanout_and_deepspeed_launcher_form_a_gloo_group(tiny, tmp_path):
    """Rendezvous only (a probe that all-reduces over a real gloo group), to keep the suite short."""
    _, cfg = tiny
    env = launch_env(LLP_TRAIN_CMD=PROBE_CMD, LLP_SKIP_CONFIG_CHECK="1")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two loopback "hosts", run locally
    out_hf, out_ds = tmp_path / "hf", tmp_path / "ds"
    r = subprocess.run([MULTINODE_SH, str(cfg), "--hostfile", str(hostfile), "--master-port", str(_free_port()),
                        "--", "--set", f"run.output_dir={out_hf}"], env=env, capture_output=True, text=True,
                       timeout=150, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "node 0 (localhost): ranks 0-0" in r.stderr + r.stdout
    r2 = subprocess.run([TRAIN_SH, str(cfg), "--nproc", "2", "--launcher", "deepspeed", "--",
                         "--set", f"run.output_dir={out_ds}"], env=env, capture_output=True, text=True,
                        timeout=150, cwd=REPO)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    for out in (out_hf, out_ds):
        recs = [json.loads((out / f"probe-rank{i}.json").read_text()) for i in range(2)]
        assert [rec["allreduce_sum"] for rec in recs] == [3.0, 3.0]       # 1 + 2 over a group of 2
        assert [rec["env"]["RANK"] for rec in recs] == ["0", "1"]
        assert {rec["env"]["MASTER_ADDR"] for rec in recs} <= {"127.0.0.1", "localhost"}


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_step_wide_term_with_dataloader_workers_checkpoints(tiny, tmp_path):
    """What `scancel --signal=TERM JOB.STEP` (and the batch script's forwarding) does: TERM to every
    process of the step, dataloader workers included. Training must still checkpoint and exit 0."""
    _, cfg = tiny
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    env = launch_env(LLP_PRETRAIN_PAUSE_AFTER_STEP="3")
    p, f = _start([TRAIN_SH, str(cfg), "--nproc", "1", "--", "--set", f"run.output_dir={out}",
                   "--set", "data.num_workers=1"], env, log)
    try:
        t0 = time.time()
        while "step       3/" not in log.read_text() and p.poll() is None and time.time() - t0 < 150:
            time.sleep(0.5)
        assert p.poll() is None, log.read_text()[-3000:]
        os.killpg(p.pid, signal.SIGTERM)          # like slurmstepd: every process of the group
        rc = p.wait(timeout=60)
    finally:
        _finish([(p, f)], 1)
    assert rc == 0, log.read_text()[-3000:]
    assert checkpoint_steps(out) == [3]
