"""launch/slurm/prep.sbatch on a real SLURM cluster (`.ci/run` starts a one-node cluster with
../shared/scripts/slurm-local-up: 2 CPUs, partition debug).

* an array of 3 tasks over the KJV (4.3 MB of real text in 9 files), then the merge as a dependent
  job: the dataset holds the same documents and tokens (as multisets) as a single-process run,
  its val shards are byte-identical, and `llp-prep verify` passes (run by the merge job);
* a task killed halfway (`scancel` of one array element while it writes its part): the merge job
  never starts (afterok, --kill-on-invalid-dep); submitting again re-does only that task and
  leaves the same dataset as the clean run.

Every job is cancelled in a ``finally`` so a failing test leaves nothing running.
"""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from data_prep import ReadOptions, build_shards, train_tokenizer
from data_prep.array import merge_parts
from launch_fixtures import REPO, launch_env
from prep_fixtures import assert_same_documents, write_corpus

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="sbatch not found: SLURM is not installed (run ../shared/scripts/slurm-local-up)"),
]

SCRIPT = str(REPO / "launch" / "slurm" / "prep.sbatch")
SEQ = "128"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurmprep")
    corpus = write_corpus(root / "corpus", files=9)
    blank = ReadOptions(doc_sep="blank-line")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=1000, read_options=blank,
                    max_sentences=20_000)
    single = root / "single"
    kw = dict(inputs=[str(corpus)], tokenizer=root / "tok", seq_len=int(SEQ), val_fraction=0.02,
              samples_per_shard=500, read_options=blank, workers=0)
    build_shards(**kw, out_dir=single)
    args = ["--input", str(corpus), "--tokenizer", str(root / "tok"), "--doc-sep", "blank-line",
            "--seq-len", SEQ, "--val-fraction", "0.02", "--samples-per-shard", "500"]
    return {"root": root, "single": single, "args": args, "kw": kw}


def submit(out: Path, args, logdir: Path, **extra):
    e = launch_env(LLP_SBATCH_FLAGS=f"--partition=debug --time=10 --cpus-per-task=1 "
                                    f"--output={logdir}/%x-%A_%a-%j.out", LLP_PREP_WORKERS="0",
                   **extra)
    r = subprocess.run(["bash", SCRIPT, "submit", "3", str(out), *args], capture_output=True,
                       text=True, env=e, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    array, merge = r.stdout.split()
    assert array.isdigit() and merge.isdigit(), r.stdout
    return array, merge


def state(job: str) -> str:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                       timeout=30)
    rec = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
    return rec.get("JobState", "GONE")


def wait_for(pred, timeout, what, poll=0.3):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def cancel(*jobs):
    for j in jobs:
        if j:
            subprocess.run(["scancel", j], capture_output=True, timeout=30)


def logs(d: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(d.glob("*.out")))


@pytest.mark.timeout(600)
def test_array_of_three_then_merge_matches_single_process(env, tmp_path):
    out, logdir = tmp_path / "ds", tmp_path / "logs"
    logdir.mkdir()
    array = merge = None
    try:
        array, merge = submit(out, env["args"], logdir)
        wait_for(lambda: state(merge) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 500,
                 "the merge job")
        assert (out / "manifest.json").is_file(), logs(logdir)
    finally:
        cancel(array, merge)
    text = logs(logdir)
    assert "OK: " in text and "3 parts merged" in text, text          # verify ran in the merge job
    m = json.loads((out / "manifest.json").read_text())
    assert m["array"]["num_tasks"] == 3 and not (out / "parts").exists()
    assert_same_documents(out, env["single"])
    single = json.loads((env["single"] / "manifest.json").read_text())
    assert [s["sha256"] for s in m["shards"] if s["split"] == "val"] == \
        [s["sha256"] for s in single["shards"] if s["split"] == "val"]


@pytest.mark.timeout(600)
def test_killed_task_is_redone_by_submitting_again(env, tmp_path):
    out, logdir = tmp_path / "ds", tmp_path / "logs"
    logdir.mkdir()
    jobs = []
    try:
        # element 2 (the largest part) is cancelled once it has written a shard of its part
        array, merge = submit(out, env["args"], logdir)
        jobs += [array, merge]
        p2 = out / "parts" / "2"
        wait_for(lambda: p2.is_dir() and any(p2.glob("train-*.tar")), 300, "task 2 writing",
                 poll=0.02)
        assert not (p2 / "manifest.json").exists(), "task 2 finished before it could be killed"
        subprocess.run(["scancel", f"{array}_2"], check=True, timeout=30)
        wait_for(lambda: state(merge) in ("CANCELLED", "GONE"), 300,
                 "the merge job to be cancelled (its dependency failed)")
        wait_for(lambda: all(state(f"{array}_{i}") in ("COMPLETED", "CANCELLED", "FAILED", "GONE")
                             for i in range(3)), 300, "the array to end")
        assert not (out / "manifest.json").exists() and not (p2 / "manifest.json").exists()
        # the same submission again: tasks 0 and 1 find their parts complete, 2 is redone
        array2, merge2 = submit(out, env["args"], logdir, LLP_PREP_ARRAY="0-2")
        jobs += [array2, merge2]
        wait_for(lambda: state(merge2) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 400,
                 "the second merge job")
        assert (out / "manifest.json").is_file(), logs(logdir)
    finally:
        cancel(*jobs)
    text = logs(logdir)
    assert text.count("is already complete; nothing to do") == 2, text
    assert "OK: " in text
    assert not (out / "parts").exists()
    assert_same_documents(out, env["single"])
    ref = tmp_path / "ref"
    for i in range(3):
        build_shards(**env["kw"], out_dir=ref, num_tasks=3, task_index=i)
    merge_parts(ref)
    for name in sorted(p.name for p in ref.glob("*.tar")):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
