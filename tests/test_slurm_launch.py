"""launch/slurm/llp_pretrain.sbatch on a real SLURM cluster (`.ci/run` starts a one-node cluster with
../shared/scripts/slurm-local-up: 2 CPUs, partition debug, no GPUs).

* 2 tasks (one srun task per process) train a tiny LLP for a few CPU steps: exit code, checkpoints,
  TensorBoard events;
* one torchrun task with 2 processes is sent TERM mid-run (`scancel --signal=TERM --batch`, what
  `#SBATCH --signal=B:TERM@120` does before the time limit): it checkpoints, the batch script requeues
  the job, and the requeued run resumes from that checkpoint without repeating a step. This one
  polls `scontrol show job` instead of `sbatch --wait`, which can return when the first run ends in
  the requeue; the final record must say COMPLETED, exit code 0:0, 1 restart.

Every job is cancelled in a ``finally`` so a failing test leaves nothing running.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launch_fixtures import REPO, checkpoint_steps, event_files, latest_meta, launch_env, tensorboard_steps, \
    write_tiny_run

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="sbatch not found: SLURM is not installed (run ../shared/scripts/slurm-local-up)"),
]

SBATCH = str(REPO / "launch" / "slurm" / "llp_pretrain.sbatch")
# the local cluster has 2 CPUs and no GPUs; the script's defaults (2 nodes x 8 GPUs) are overridden here
BASE_FLAGS = ["--parsable", "--nodes=1", "--gpus-per-node=0", "--time=10", "--partition=debug"]


def _job_state(job_id: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def _cancel(job_id):
    if job_id:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def _job_record(job_id: str) -> dict:
    """`scontrol show job` fields (empty once SLURM forgot the job, ~5 s after it ended)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv) if r.returncode == 0 else {}


def _submit(flags, cfg, args, env, log: Path, wait: bool = True):
    """Start `sbatch [--wait]` (under `timeout`); return (Popen, job id)."""
    cmd = ["timeout", "240", "sbatch", *BASE_FLAGS, *(["--wait"] if wait else []), *flags, f"--output={log}",
           SBATCH, str(cfg), *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    job_id = p.stdout.readline().strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch did not print a job id: {job_id!r} {p.stderr.read() if p.poll() is not None else ''}"
    return p, job_id


def _wait_for(pred, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.timeout(300)
def test_sbatch_two_tasks_train_checkpoint_and_tensorboard(tmp_path):
    cfg = write_tiny_run(tmp_path, max_steps=4, save_interval=2)
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    job = None
    try:
        p, job = _submit(["--ntasks-per-node=2", "--cpus-per-task=1"], cfg, [], launch_env(), log)
        rc = p.wait(timeout=260)
        text = log.read_text() if log.exists() else ""
        assert rc == 0, f"sbatch --wait exit {rc}\n{p.stderr.read()}\n{text[-4000:]}"
    finally:
        _cancel(job)
    assert "mode=srun" in text and "rank 1/2 (local 1) on node 0" in text
    assert "world layout (slurm/srun): nodes=1 nproc_per_node=2 world_size=2 data_parallel_size=2" in text
    assert checkpoint_steps(run) == [2, 4]
    meta = latest_meta(run)
    assert meta["step"] == 4 and meta["layout"]["world_size"] == 2
    assert len(event_files(run / "tensorboard")) == 1           # rank 0 only
    assert tensorboard_steps(run) == [1, 2, 3, 4]


def _node_state() -> str:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
    return out.split()[0] if out.split() else ""


@pytest.mark.timeout(360)
def test_sbatch_term_checkpoints_requeues_and_resumes(tmp_path):
    cfg = write_tiny_run(tmp_path, max_steps=6, save_interval=0)
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    # test hook of the engine: after step 3 the ranks idle until a signal arrives (TERM lands mid-run).
    # One dataloader worker per rank: SLURM signals every process of the step, workers included.
    env = launch_env(LLP_NPROC_PER_NODE="2", LLP_PRETRAIN_PAUSE_AFTER_STEP="3", LLP_DATA_WORKERS="1")
    job = None
    try:
        # no --wait: sbatch --wait may return when the first run ends in the requeue
        _, job = _submit(["--ntasks-per-node=1", "--cpus-per-task=2"], cfg, [], env, log, wait=False)
        _wait_for(lambda: log.exists() and "step       3/6" in log.read_text(), 200, "step 3 in the job log")
        subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, timeout=30)
        # the batch script forwards TERM, training saves step 3 and exits, the job is requeued (pending)
        _wait_for(lambda: _job_record(job).get("JobState") == "PENDING", 120, "the job to be requeued")
        assert checkpoint_steps(run) == [3], log.read_text()[-3000:]
        # SLURM holds requeued jobs ~2 minutes (BeginTime); release it now, but only once the node has
        # finished the first run and a second has passed: slurmd refuses ("Job credential revoked") a
        # credential issued within the same second as the requeue's revocation, which a fast machine hits
        _wait_for(lambda: _node_state() == "idle", 120, "the node to finish cleaning up the first run")
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
        final, seen = {}, []

        def finished():
            rec = _job_record(job)
            state = rec.get("JobState")
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in TERMINAL:
                final.update(rec)
                return True
            return False

        _wait_for(finished, 200, "the requeued job to finish")
        text = log.read_text()
        assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), \
            f"states seen {seen}; final record {final}\n{text[-4000:]}"
    finally:
        _cancel(job)
    assert "received SIGTERM" in text and f"requeueing job {job}" in text
    assert "(restart 1)" in text and "mode=torchrun" in text and "1 dataloader worker(s)/process" in text
    # the checkpoint-and-stop run and the resumed run both exited cleanly (torchrun did not turn TERM
    # into a failure)
    assert text.count("training exited with status 0") == 2, text[-4000:]
    assert checkpoint_steps(run)[-1] == 6
    assert latest_meta(run)["step"] == 6
    # resumed from step 3: steps 1-3 from the first run, 4-6 from the second, none repeated
    assert tensorboard_steps(run) == [1, 2, 3, 4, 5, 6]
    assert text.count("step       4/6") == 1 and text.count("step       3/6") == 1


@pytest.mark.timeout(120)
def test_sbatch_refuses_a_wrong_layout_before_training(tmp_path):
    cfg = write_tiny_run(tmp_path, max_steps=4)
    log = tmp_path / "job.out"
    job = None
    try:
        p, job = _submit(["--ntasks-per-node=2", "--cpus-per-task=1"], cfg,
                         ["--set", "parallel.sequence_parallel_size=4"], launch_env(), log)
        rc = p.wait(timeout=100)
    finally:
        _cancel(job)
    text = log.read_text()
    assert rc == 2, text[-3000:]
    assert "too few processes for sequence parallelism: world_size=2" in text
    assert "rank 0/2" not in text and not (tmp_path / "run").exists()   # no task was started
