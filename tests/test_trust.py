"""Trust boundaries and run identity (issue: no silent wrong results).

* Loading a checkpoint never runs code: a pickle planted in the model states, the ZeRO optimizer
  states or the RNG file is refused by ``export``, ``eval``, ``generate`` and ``train --resume``,
  and the planted code does not run.
* A run directory that holds checkpoints is never silently restarted.
* A resume checks the model config, the tokenizer and the dataset before anything is built.
* ``init_from`` with weights of another shape names the tensors.

Real DeepSpeed runs (ZeRO-0 and ZeRO-1, one process each) on a tiny synthetic dataset.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llp_pretrain import checkpoint as ckpt
from tiny_runs import tiny_run_config, write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("llp-pretrain"))

pytestmark = [pytest.mark.distributed]


class _Planted:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(path: Path, marker: Path, raw: bool = False) -> None:
    """A file a loader would unpickle: ``torch.save`` format (as DeepSpeed writes), or a bare pickle."""
    if raw:
        with open(path, "wb") as f:
            pickle.dump({"module": _Planted(marker)}, f)
    else:
        torch.save({"module": _Planted(marker)}, path)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(*args, timeout=300):
    return subprocess.run([CLI, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _write_cfg(path: Path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs (ZeRO-0 and ZeRO-1, 2 steps, checkpoint at 1 and 2) and their configs."""
    w = tmp_path_factory.mktemp("trust")
    write_tiny_dataset(w / "ds", seq_len=16, train_samples=[12, 12], val_samples=[4], vocab_size=48)
    write_tiny_dataset(w / "ds_other", seq_len=16, train_samples=[12, 12], val_samples=[4], vocab_size=48, seed=5)
    cfgs = {}
    jobs = []
    for st in (0, 1):
        cfgs[st] = tiny_run_config(w / "ds", w / f"z{st}", train={"max_steps": 2, "save_interval": 1},
                                   model={"dropout": 0.1}, deepspeed=f"configs/deepspeed/zero{st}.json")
        jobs.append({"config": cfgs[st], "result": None})
    (w / "spec.json").write_text(json.dumps(jobs))
    p = subprocess.run([sys.executable, str(REPO / "tests" / "train_many.py"), "train-many", str(w / "spec.json")], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    return w, cfgs


def _copy_run(runs, st, name):
    w, cfgs = runs
    dst = w / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(w / f"z{st}", dst)
    cfg = json.loads(json.dumps(cfgs[st]))
    cfg["run"]["output_dir"] = str(dst)
    return dst, cfg


def test_rng_state_is_stored_without_pickle(runs):
    w, _ = runs
    tag = w / "z0" / "checkpoints" / "step00000002"
    assert (tag / "rng_rank00000.safetensors").is_file()
    assert not list(tag.glob("rng_rank*.pt"))
    assert ckpt.load_rank_rng(tag, 0)


def test_planted_rng_pickle_is_refused(runs, tmp_path):
    run, cfg = _copy_run(runs, 0, "rng_planted")
    tag = run / "checkpoints" / "step00000002"
    marker = tmp_path / "ran"
    (tag / "rng_rank00000.safetensors").unlink()
    _plant(tag / "rng_rank00000.pt", marker)  # the old pickled name
    cfg["train"]["max_steps"] = 3
    p = _cli("train", "--config", _write_cfg(tmp_path / "c.yaml", cfg), "--resume", "auto")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "rng_rank00000.pt" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()
    # a damaged safetensors RNG file is named, not a traceback
    (tag / "rng_rank00000.pt").unlink()
    (tag / "rng_rank00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="rng_rank00000.safetensors"):
        ckpt.load_rank_rng(tag, 0)


def _main(capsys, *args):
    """``llp-pretrain ARGS`` in this process: (exit status, stderr)."""
    from llp_pretrain.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("stage,victim", [(0, "mp_rank_00_model_states.pt"),
                                          (1, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_planted_checkpoint_pickle_never_runs(runs, tmp_path, capsys, stage, victim):
    run, cfg = _copy_run(runs, stage, f"planted{stage}")
    marker = tmp_path / "ran"
    planted = run / "checkpoints" / "step00000002" / victim
    w = runs[0]
    _plant(planted, marker, raw=True)  # a bare pickle: named, not run
    rc, err = _main(capsys, "export", str(run), str(tmp_path / "exp0"))
    assert rc == 2 and victim in err, err
    assert not marker.exists()
    _plant(planted, marker)  # torch.save format, as DeepSpeed writes
    for args in (["export", str(run), str(tmp_path / "exp")],
                 ["eval", "--checkpoint", str(run), "--data", str(w / "ds")],
                 ["generate", "--checkpoint", str(run), "--prompt", "x"]):
        rc, err = _main(capsys, *args)
        assert rc == 2, (args, err)
        assert victim in err and "could run code" in err and "pathlib" in err, err  # file and global named
        assert not marker.exists(), args
    cfg["train"]["max_steps"] = 3
    p = _cli("train", "--config", _write_cfg(tmp_path / "c.yaml", cfg), "--resume", "auto")
    assert p.returncode == 2 and victim in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not marker.exists()


def test_deepspeed_loads_are_forced_weights_only(tmp_path):
    """The belt under the scan: inside ``weights_only_loads`` even a ``torch.load(weights_only=False)``
    (DeepSpeed's call) refuses a pickle with code."""
    marker = tmp_path / "ran"
    _plant(tmp_path / "x.pt", marker)
    with ckpt.weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "x.pt", weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_reused_run_dir_is_refused_without_resume(runs, tmp_path):
    run, cfg = _copy_run(runs, 0, "reuse")
    path = _write_cfg(tmp_path / "c.yaml", cfg)
    before = (run / "checkpoints" / "latest").read_text()
    p = _cli("train", "--config", path)
    assert p.returncode == 2 and "--resume auto" in p.stderr and "--overwrite" in p.stderr, p.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text() == before
    p = _cli("train", "--config", path, "--resume", "auto", "--overwrite")
    assert p.returncode == 2 and "contradict" in p.stderr
    # a finished run re-run with --resume auto does nothing (no duplicate val point, no new checkpoint)
    events = sorted((run / "tensorboard").glob("events.*"))
    p = _cli("train", "--config", path, "--resume", "auto")
    assert p.returncode == 0 and "nothing to do" in p.stdout, p.stderr[-2000:]
    assert sorted((run / "tensorboard").glob("events.*")) == events
    # --overwrite starts afresh: the old checkpoints are gone, the new run's are there
    cfg["train"]["max_steps"] = 1
    p = _cli("train", "--config", _write_cfg(tmp_path / "c1.yaml", cfg), "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]
    assert ckpt.complete_tags(run / "checkpoints") == ["step00000001"]


def test_resume_identity_checks(runs, tmp_path):
    run, cfg = _copy_run(runs, 0, "ident")
    cfg["train"]["max_steps"] = 3
    other = json.loads(json.dumps(cfg))
    other["model"]["d_model"] = 48
    p = _cli("train", "--config", _write_cfg(tmp_path / "m.yaml", other), "--resume", "auto")
    assert p.returncode == 2 and "model.d_model: 32 -> 48" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "params | world" not in p.stdout  # refused before the engine was built
    other = json.loads(json.dumps(cfg))
    other["data"]["path"] = str(runs[0] / "ds_other")
    path = _write_cfg(tmp_path / "d.yaml", other)
    hashes_before = (run / "hashes.json").read_text()
    p = _cli("train", "--config", path, "--resume", "auto")
    assert p.returncode == 2 and "another dataset" in p.stderr and "allow_data_change" in p.stderr, p.stderr
    assert (run / "hashes.json").read_text() == hashes_before
    p = _cli("train", "--config", path, "--resume", "auto", "--set", "train.allow_data_change=true")
    assert p.returncode == 0 and "data changed at step 2" in p.stdout, p.stderr[-2000:]
    meta = ckpt.read_meta(run / "checkpoints" / "step00000003")
    assert meta["data_start_step"] == 2
    assert meta["hashes"]["manifest_sha256"] != json.loads(hashes_before)["manifest_sha256"]


def test_resume_identity_refuses_another_tokenizer():
    from llp_pretrain.run_identity import check_resume_identity

    meta = {"step": 4, "model": {"d_model": 8}, "hashes": {"manifest_sha256": "a", "tokenizer_manifest_sha256": "t1"}}
    with pytest.raises(ValueError, match="tokenizer sha256"):
        check_resume_identity(meta, {"d_model": 8}, {"manifest_sha256": "b", "tokenizer_manifest_sha256": "t2"},
                              True, "CKPT")
    # activation checkpointing is how a step is computed, not what: free to change
    assert check_resume_identity({**meta, "model": {"d_model": 8, "checkpoint_activations": False}},
                                 {"d_model": 8, "checkpoint_activations": True},
                                 {"manifest_sha256": "a", "tokenizer_manifest_sha256": "t1"}, False, "CKPT") == 0


def test_init_from_with_other_shapes_names_the_tensors(runs, tmp_path):
    from llp_pretrain.export import export_checkpoint, load_exported_weights
    from llp_pretrain.models import build_model

    w, cfgs = runs
    export_checkpoint(w / "z0", tmp_path / "exp")
    model_cfg = json.loads((tmp_path / "exp" / "model_config.json").read_text())
    model = build_model({**model_cfg, "d_model": 48})
    with pytest.raises(ValueError, match=r"wrong shapes tok_emb.weight \(48, 32\) vs \(48, 48\)"):
        load_exported_weights(model, tmp_path / "exp")
