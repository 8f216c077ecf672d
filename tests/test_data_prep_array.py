"""Array jobs in-process (the SLURM run is tests/test_slurm_prep.py): the plan, parts, merge, reruns
and refusals. Real SentencePiece and WebDataset; a few hundred KB of real text."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import DataPrepError, ReadOptions, build_shards, train_tokenizer, verify_dataset
from data_prep.array import merge_parts, plan_tasks
from data_prep.cli import main as cli_main
from prep_fixtures import assert_same_documents, write_corpus

REPO = Path(__file__).resolve().parents[1]
BLANK = ReadOptions(doc_sep="blank-line")
KW = dict(seq_len=64, val_fraction=0.05, samples_per_shard=40, read_options=BLANK)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("array")
    corpus = write_corpus(root / "corpus", files=7, chapters=400)
    train_tokenizer([str(corpus)], root / "tok", vocab_size=600, read_options=BLANK)
    single = root / "single"
    build_shards([str(corpus)], root / "tok", single, **KW)
    return {"root": root, "corpus": corpus, "tok": root / "tok", "single": single}


def run_array(env, out, order, n=3, **kw):
    for i in order:
        m = build_shards([str(env["corpus"])], env["tok"], out, num_tasks=n, task_index=i,
                         **dict(KW, **kw))
        # a part manifest, or the merged one when the job is already merged
        assert (m.get("kind") == "part" and m["task_index"] == i) or "array" in m


def tree(d: Path):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_plan_is_contiguous_balanced_and_covers_every_file():
    sizes = [5, 1, 1, 1, 9, 2, 2, 3, 3, 3, 0, 7]
    for n in (1, 2, 3, 5, 12, 20):
        tasks = plan_tasks(sizes, n)
        assert len(tasks) == n and sum(tasks, []) == list(range(len(sizes)))   # contiguous, in order
        if n <= 3:
            loads = [sum(sizes[j] for j in t) for t in tasks]
            assert max(loads) - min(loads) <= max(sizes)
    assert plan_tasks(sizes, 3) == plan_tasks(list(sizes), 3)


def test_three_tasks_merge_to_the_single_process_documents(env, tmp_path):
    out = tmp_path / "arr"
    run_array(env, out, [2, 0, 1])
    plan = json.loads((out / "parts" / "plan.json").read_text())
    assert [t["sources"] for t in plan["tasks"]] == [
        ["part00.txt", "part01.txt", "part02.txt", "part03.txt"], ["part04.txt", "part05.txt"],
        ["part06.txt"]]
    m = merge_parts(out)
    assert not (out / "parts").exists()
    assert verify_dataset(out)["ok"], verify_dataset(out)["errors"][:3]
    assert m["array"]["num_tasks"] == 3 and len(m["array"]["streams"]) == 4
    assert_same_documents(out, env["single"])
    # the val split is packed as one stream: byte-identical to the single-process run's
    single = json.loads((env["single"] / "manifest.json").read_text())
    assert [s for s in m["shards"] if s["split"] == "val"] == \
        [s for s in single["shards"] if s["split"] == "val"]
    # the merged train stream drops one tail, like a single run
    assert m["totals"]["train"]["dropped_tail_tokens"] <= KW["seq_len"]


def test_result_does_not_depend_on_task_order(env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_array(env, a, [0, 1, 2])
    run_array(env, b, [2, 1, 0])
    merge_parts(a)
    merge_parts(b)
    assert tree(a) == tree(b)


def test_merge_refuses_missing_or_incomplete_parts_and_rerun_redoes_only_those(env, tmp_path):
    out = tmp_path / "arr"
    run_array(env, out, [0, 2])
    with pytest.raises(DataPrepError, match=r"1 of 3 parts are not complete \(part 1: missing\)"):
        merge_parts(out)
    # a killed task: its part has the run marker and a partial shard, no manifest
    run_array(env, out, [1])
    p1 = out / "parts" / "1"
    (p1 / "manifest.json").unlink()
    (p1 / "train-000003.tar.partial").write_bytes(b"half")
    with pytest.raises(DataPrepError, match=r"part 1: incomplete") as e:
        merge_parts(out)
    assert "--array=1" in str(e.value)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts" / "0").iterdir()}
    run_array(env, out, [0, 1, 2])                  # the whole array again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts" / "0").iterdir()} == before
    assert not list(p1.glob("*.partial"))
    merge_parts(out)
    assert verify_dataset(out)["ok"]
    ref = tmp_path / "ref"
    run_array(env, ref, [0, 1, 2])
    merge_parts(ref)
    assert tree(out) == tree(ref)
    # tasks run after the merge have nothing to do; merging again is a no-op
    run_array(env, out, [1])
    merge_parts(out)
    assert tree(out) == tree(ref)


def test_a_different_job_in_the_same_out_is_refused(env, tmp_path):
    out = tmp_path / "arr"
    run_array(env, out, [0])
    with pytest.raises(DataPrepError, match="belongs to a different job"):
        run_array(env, out, [0], n=4)
    run_array(env, out, [0, 1, 2, 3], n=4, overwrite=True)
    m = merge_parts(out)
    assert m["array"]["num_tasks"] == 4 and verify_dataset(out)["ok"]
    assert_same_documents(out, env["single"])


def test_cli_takes_the_task_from_slurm_variables(env, tmp_path):
    out = tmp_path / "arr"
    args = ["shard", "--input", str(env["corpus"]), "--tokenizer", str(env["tok"]), "--out",
            str(out), "--doc-sep", "blank-line", "--seq-len", "64", "--val-fraction", "0.05",
            "--samples-per-shard", "40", "-q"]
    base = dict(os.environ, PYTHONPATH=str(REPO))
    for i in range(2):
        r = subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True,
                           text=True, env=dict(base, SLURM_ARRAY_TASK_COUNT="2",
                                               SLURM_ARRAY_TASK_ID=str(i)))
        assert r.returncode == 0, r.stderr
        assert f"task {i} of 2" in r.stdout
    assert cli_main(["merge", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"]["argv"][-2:] == ["--num-tasks", "2"]      # recorded, --task-index not
    assert "--task-index" not in m["command"]["argv"]
    r = subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True,
                       env=dict(base, SLURM_ARRAY_TASK_COUNT="x", SLURM_ARRAY_TASK_ID="0"))
    assert r.returncode == 2 and "$SLURM_ARRAY_TASK_COUNT='x' is not an integer" in r.stderr
    assert cli_main(["merge", str(tmp_path / "nothing")]) == 2


def test_damaged_plan_or_part_manifest_is_one_line(env, tmp_path, capsys):
    out = tmp_path / "arr"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "plan.json").write_text('{"num_tasks": "three"}')
    assert cli_main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "plan.json: not a plan written by llp-prep" in err and "Traceback" not in err
    shutil.rmtree(out)
    run_array(env, out, [0, 1])
    pm = json.loads((out / "parts" / "1" / "manifest.json").read_text())
    del pm["streams"]["val"]
    (out / "parts" / "1" / "manifest.json").write_text(json.dumps(pm))
    assert cli_main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "part 1: damaged" in err and "part 2: missing" in err and "--array=1,2" in err


def test_the_training_loader_and_eval_read_a_merged_dataset(env, tmp_path):
    """The contract with llp_pretrain: train shards of N + 1 streams stream like any others, and
    the val split is one stream, the same as a single run's (what eval reassembles)."""
    from llp_pretrain.data import TrainStream, make_train_loader, read_split_stream

    out = tmp_path / "arr"
    run_array(env, out, [0, 1, 2])
    merge_parts(out)
    assert (read_split_stream(str(out), "val") == read_split_stream(str(env["single"]), "val")).all()
    stream = TrainStream(str(out), global_batch_size=8, micro_batch_size=4, dp_size=2, dp_rank=1, num_workers=1, seed=0)
    batches = iter(make_train_loader(stream))
    keys = [k for _ in range(5) for k in next(batches)["keys"]]
    assert len(set(keys)) == 20 and all(k.split("/")[1].startswith("train_s") for k in keys)


def test_eval_split_train_on_a_merged_dataset(env, tmp_path, capsys):
    """`llp-pretrain eval --split train` on a merged array dataset: its train split holds one stream
    per task (plus the tail stream); each is reassembled on its own, then they are concatenated
    (they used to be refused as 'shards out of order')."""
    import torch
    from safetensors.torch import save_file

    from llp_pretrain.cli import main as train_cli
    from llp_pretrain.config import read_manifest
    from llp_pretrain.data import read_split_stream
    from llp_pretrain.models import build_model

    out = tmp_path / "arr"
    run_array(env, out, [2, 0, 1])
    merge_parts(out)
    m = read_manifest(out)
    per_stream = {}
    for sh in m["shards"]:
        if sh["split"] == "train":
            per_stream[sh.get("stream", 0)] = per_stream.get(sh.get("stream", 0), 0) + sh["samples"]
    assert len(per_stream) >= 3
    stream = read_split_stream(str(out), "train")
    assert len(stream) == sum(n * m["seq_len"] + 1 for n in per_stream.values())
    # a model "exported" for this tokenizer and seq_len (random weights: only the data path is under test)
    cfg = dict(variant="llp", vocab_size=m["tokenizer"]["piece_count"], d_model=16, n_heads=2, n_layers=1,
               seq_len=m["seq_len"], segment_len=8)
    torch.manual_seed(0)
    model = build_model(cfg)
    exp = tmp_path / "exp"
    exp.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(exp / "model.safetensors"))
    (exp / "model_config.json").write_text(json.dumps(cfg))
    shutil.copyfile(env["tok"] / "tokenizer.model", exp / "tokenizer.model")
    capsys.readouterr()
    rc = train_cli(["eval", "--checkpoint", str(exp), "--data", str(out), "--split", "train", "--json",
                    "--stride", "64", "--batch-size", "64"])
    res, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    res = json.loads(res)
    assert res["tokens"] > 0 and res["bits_per_byte"] is not None
