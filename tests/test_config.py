"""Run-config loading: overrides, derived batch sizes, one-pass error reports, shipped configs."""
import json
from pathlib import Path

import pytest
import yaml

from llp_pretrain.cli import main as cli_main
from llp_pretrain.config import ConfigError, load_config, parse_overrides
from tiny_runs import tiny_run_config, write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    write_tiny_dataset(d, seq_len=16, train_samples=[4, 4], vocab_size=50)
    return d


def test_derives_accumulation_and_fills_deepspeed_json(ds, tmp_path):
    raw = tiny_run_config(ds, tmp_path / "run", train={"global_batch_size": 16, "micro_batch_size": 2})
    cfg = load_config(raw=raw, world_size=2)
    assert cfg.data_parallel_size == 2
    assert cfg.train.grad_accum_steps == 4
    assert cfg.model.vocab_size == 50  # vocab_size: auto -> manifest piece_count
    assert cfg.ds_config["train_batch_size"] == 16
    assert cfg.ds_config["train_micro_batch_size_per_gpu"] == 2
    assert cfg.ds_config["gradient_accumulation_steps"] == 4
    assert cfg.ds_config["zero_optimization"]["stage"] == 0


def test_overrides_are_typed_and_nested(ds, tmp_path):
    raw = tiny_run_config(ds, tmp_path / "run")
    cfg = load_config(raw=raw, overrides=["train.lr=1e-3", "train.betas=[0.8, 0.9]", "model.n_layers=3",
                                          "deepspeed=configs/deepspeed/zero2.json"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.model.n_layers == 3
    assert cfg.ds_config["zero_optimization"]["stage"] == 2
    assert parse_overrides(["a.b=true"]) == [(["a", "b"], True)]


def test_all_errors_reported_together_with_lines_and_suggestions(ds, tmp_path):
    raw = tiny_run_config(ds, tmp_path / "run", model={"seq_len": 32, "segment_len": 4, "vocab_size": 20},
                          train={"micro_batch_size": 3, "global_batch_size": 8, "wamup_steps": 1,
                                 "max_steps": "many"})
    raw["data"]["shufle_buffer"] = 4
    raw["tarin"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as ei:
        load_config(path, world_size=2)
    msg = str(ei.value)
    locs = [loc for loc, _ in ei.value.problems]
    # unknown keys with the nearest valid name
    assert "did you mean 'warmup_steps'" in msg and "did you mean 'shuffle_buffer'" in msg and "did you mean 'train'" in msg
    # wrong type
    assert any(loc.startswith("train.max_steps") for loc in locs)
    # cross-field: seq_len vs manifest, vocab vs piece count
    assert any(loc.startswith("model.seq_len") for loc in locs) and "differs from the shards' seq_len 16" in msg
    assert any(loc.startswith("model.vocab_size") for loc in locs) and "piece count 50" in msg
    # every problem names its line in the file
    assert str(path) in msg and "(line " in msg
    assert any(loc.startswith("train.global_batch_size") for loc in locs)
    assert len(ei.value.problems) == 7


def test_batch_size_rule(ds, tmp_path):
    raw = tiny_run_config(ds, tmp_path / "run", train={"micro_batch_size": 2, "grad_accum_steps": 2,
                                                       "global_batch_size": 6})
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw, world_size=2)
    assert ("global_batch_size=6 != train.micro_batch_size=2 x train.grad_accum_steps=2 x data_parallel_size=2 "
            "(= 8)") in str(ei.value)


def test_layout_rules(ds, tmp_path):
    raw = tiny_run_config(ds, tmp_path / "run", parallel={"sequence_parallel_size": 2},
                          model={"variant": "gpt", "segment_len": None})
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw, world_size=3)
    msg = str(ei.value)
    assert "world_size=3 is not divisible by parallel.sequence_parallel_size=2" in msg
    assert "needs model.variant: llp" in msg


def test_sequence_parallel_needs_whole_segments_per_rank(ds, tmp_path):
    # seq_len 16, segment_len 4: P=2 keeps 2 segments per rank, P=4 one, P=8 half a segment
    for p in (2, 4):
        raw = tiny_run_config(ds, tmp_path / "run", parallel={"sequence_parallel_size": p})
        assert load_config(raw=raw, world_size=p).data_parallel_size == 1
    raw = tiny_run_config(ds, tmp_path / "run", parallel={"sequence_parallel_size": 8})
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw, world_size=8)
    assert "model.seq_len" in str(ei.value) and "8 * 4 = 32" in str(ei.value)


def test_data_parallel_size_must_divide_the_virtual_readers(ds, tmp_path):
    raw = tiny_run_config(ds, tmp_path / "run", data={"num_workers": 4})
    cfg = load_config(raw=raw, world_size=2)  # 2 shards: 2 virtual readers, any number of workers
    assert cfg.data.virtual_readers == 2 and cfg.to_dict()["data"]["virtual_readers"] == 2
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw, world_size=4)
    assert [loc for loc, _ in ei.value.problems] == ["train.global_batch_size"]
    assert "data_parallel_size=4 does not divide the 2 virtual data readers" in str(ei.value)
    with pytest.raises(ConfigError, match="data.virtual_readers.*must divide train.global_batch_size=4"):
        load_config(raw=tiny_run_config(ds, tmp_path / "run", data={"virtual_readers": 3}), world_size=2)


def test_deepspeed_json_conflicts_with_yaml(ds, tmp_path):
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 7,
                              "optimizer": {"type": "Adam"}}))
    raw = tiny_run_config(ds, tmp_path / "run", deepspeed=str(js))
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw)
    msg = str(ei.value)
    assert "train_micro_batch_size_per_gpu" in msg and "says 7" in msg
    assert "'optimizer' section" in msg


def test_cli_check_config_exit_code_and_message(ds, tmp_path, capsys):
    raw = tiny_run_config(ds, tmp_path / "run", train={"micro_batch_siz": 2})
    del raw["train"]["micro_batch_size"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'micro_batch_size'" in err
    assert "train.micro_batch_size" in err and "required key is missing" in err


@pytest.mark.parametrize("name,world", [("configs/quickstart.yaml", 1), ("configs/llp_125m.yaml", 8),
                                        ("configs/llp_350m.yaml", 16), ("configs/llp_1.3b.yaml", 64)])
def test_shipped_configs_validate(name, world):
    sets = ["model.vocab_size=2000"] if "quickstart" in name else []
    cfg = load_config(name, sets, world_size=world, check_data=False)
    assert cfg.model.variant == "llp"
    t = cfg.train
    assert t.global_batch_size == t.micro_batch_size * t.grad_accum_steps * cfg.data_parallel_size
    if name != "configs/quickstart.yaml":
        assert 8192 <= cfg.model.seq_len <= 32768


def test_cli_accepts_deepspeed_launcher_local_rank():
    from llp_pretrain.cli import build_parser

    # `deepspeed` puts --local_rank=N right after the script, before the sub-command
    a = build_parser().parse_args(["--local_rank=1", "train", "--config", "c.yaml", "--resume", "auto"])
    assert (a.command, a.config, a.resume, a.local_rank) == ("train", "c.yaml", "auto", 1)
    a = build_parser().parse_args(["train", "--config", "c.yaml", "--local_rank=0", "--set", "train.lr=1"])
    assert a.overrides == ["train.lr=1"]


def test_tokenizer_found_where_the_manifest_says_and_hash_checked(tmp_path):
    """README layout `data/tok` + `data/shards`: the tokenizer is found through the manifest's
    recorded path; a decoy tokenizer.model next to the shards with another hash is not taken."""
    import hashlib

    from llp_pretrain.config import DataConfig, resolve_tokenizer

    tok = tmp_path / "data" / "tok" / "tokenizer.model"
    tok.parent.mkdir(parents=True)
    tok.write_bytes(b"the real tokenizer")
    shards = tmp_path / "data" / "shards"
    shards.mkdir()
    (tmp_path / "data" / "tokenizer.model").write_bytes(b"a decoy")
    manifest = {"tokenizer": {"path": str(tok), "sha256": hashlib.sha256(b"the real tokenizer").hexdigest()}}
    data = DataConfig(path=str(shards))
    assert resolve_tokenizer(data, manifest) == tok
    assert resolve_tokenizer(data, {"tokenizer": {"path": str(tok), "sha256": "0" * 64}}) is None
    assert resolve_tokenizer(DataConfig(path=str(shards), tokenizer="x.model"), manifest) == Path("x.model")


def test_set_override_errors_are_attributed_to_set_not_a_yaml_line(ds, tmp_path):
    raw = tiny_run_config(ds, tmp_path / "run")
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides=["train.max_step=10", "train.lr=fast"])
    locs = dict(ei.value.problems)
    assert "train.max_step (--set)" in locs and "did you mean 'max_steps'" in locs["train.max_step (--set)"]
    assert any(loc.startswith("train.lr") and loc.endswith("(--set)") for loc in locs)
    assert not any("(line" in loc for loc in locs)


def test_seventeen_problems_come_in_one_round(ds, tmp_path):
    """Wrong fields do not hide the checks of their neighbours: cross-field rules, the model's own
    combination checks and the DeepSpeed JSON are checked next to wrong fields of the same section,
    and malformed --set items are reported together with everything else."""
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"fp16": True, "zero_optimization": {"stage": 7}, "optimizer": {"type": "Adam"},
                              "train_micro_batch_size_per_gpu": 7}))
    (tmp_path / "afile").write_text("x")
    raw = tiny_run_config(ds, tmp_path / "afile", deepspeed=str(js),
                          model={"n_layers": "two", "segment_len": 5, "vocab_size": 20},
                          data={"shuffle_buffer": 0, "num_workers": 4, "virtual_readers": 0},
                          train={"max_steps": "many", "lr": 1e-3, "min_lr": 1e-2, "micro_batch_size": 3,
                                 "global_batch_size": 8},
                          parallel={"sequence_parallel_size": 1})
    raw["tarin"] = {}
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides=["train.warmup_steps", "model.d_model=[1", "train.eps=-1"], world_size=2)
    got = [(loc.split(" (")[0], msg) for loc, msg in ei.value.problems]
    text = str(ei.value)
    expected = {
        "--set train.warmup_steps": "expected key.sub=value",            # malformed --set items ...
        "--set model.d_model=[1": "value is not valid YAML",
        "train.eps": "greater than 0",                                    # ... do not hide a valid one
        "tarin": "did you mean 'train'",
        "run.output_dir": "exists and is not a directory",
        "model.n_layers": "valid integer",
        "model": "seq_len (16) must be a multiple of segment_len (5)",   # the model's own check, n_layers wrong
        "model.vocab_size": "smaller than the tokenizer's piece count 50",
        "data.shuffle_buffer": "greater than or equal to 1",
        "data.virtual_readers": "greater than or equal to 1",
        "train.max_steps": "valid integer",
        "train.global_batch_size": "not a positive multiple of train.micro_batch_size",  # cross check, max_steps wrong
        "train.min_lr": "0.01 is above train.lr 0.001",
        "deepspeed:fp16": '"fp16" must be a JSON object',
        "deepspeed:zero_optimization.stage": "stage 7 must be 0, 1, 2 or 3",
        "deepspeed:optimizer": "has a 'optimizer' section",
        "deepspeed:train_micro_batch_size_per_gpu": "says 7 but the run config gives 3",
    }
    for loc, needle in expected.items():
        assert any(l == loc and needle in m for l, m in got), (loc, needle, text)
    assert len(got) == len(expected) == 17, text
    assert "(line " in text and "(--set)" in text


def test_model_combination_problem_is_not_invented_from_a_stand_in(ds, tmp_path):
    # d_model is wrong: the head-width checks (which need it) are not run with a stand-in value
    raw = tiny_run_config(ds, tmp_path / "run", model={"d_model": "wide", "n_heads": 3})
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw)
    assert [loc for loc, _ in ei.value.problems] == ["model.d_model"]
    # n_layers is wrong (a stand-in is safe for it): the head-width check still runs
    raw = tiny_run_config(ds, tmp_path / "run", model={"n_layers": 0, "n_heads": 3})
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw)
    msgs = dict(ei.value.problems)
    assert "model.n_layers" in msgs and "d_model (32) must be divisible by n_heads (3)" in msgs["model"]


# ---------------------------------------------------------------------------------------------
# bad input found by probing: one line per problem, every problem in one round, exit 2, no traceback

def _check_config_fails(capsys, argv):
    capsys.readouterr()
    assert cli_main(["check-config", *map(str, argv)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    return err


def test_config_directory_is_named_a_directory(ds, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_run_config(ds, tmp_path / "run")))
    err = _check_config_fails(capsys, ["--config", tmp_path])
    assert err.strip().splitlines() == [f"llp-pretrain check-config: error: config '{tmp_path}' is a directory, not "
                                        "a run YAML file; give the file (it holds: run.yaml)"]


def test_config_that_is_no_regular_file_is_named_so(tmp_path, capsys):
    """A FIFO is never opened (it would block), a symlink loop and a device are not 'not found'."""
    import os

    fifo, loop = tmp_path / "fifo.yaml", tmp_path / "loop.yaml"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    for path in (fifo, loop, "/dev/null"):
        err = _check_config_fails(capsys, ["--config", path])
        assert err.strip().splitlines() == [f"llp-pretrain check-config: error: config '{path}' is not a regular file "
                                            "(a FIFO, a device, or a symlink that does not resolve); give the run "
                                            "YAML file"]


def test_manifest_that_is_a_symlink_loop_is_named_so(ds, tmp_path, capsys):
    import shutil

    from llp_pretrain.config import read_manifest

    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to(copy / "manifest.json")
    with pytest.raises(ValueError, match=r"manifest.json is not a regular file \(or a symlink that does not resolve\)"):
        read_manifest(copy)


def test_absurd_max_steps_is_refused(ds, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_run_config(ds, tmp_path / "run")))
    err = _check_config_fails(capsys, ["--config", tmp_path / "run.yaml", "--set", "train.max_steps=100000000000000000000"])
    assert "train.max_steps" in err and "Traceback" not in err


def test_independent_cross_field_problems_are_all_reported_even_without_a_layout(ds, tmp_path):
    """The probe input bad1.yaml: the batch rule and two model rules were reported one round at a time."""
    raw = tiny_run_config(ds, tmp_path / "run")
    raw["model"].update(d_model=30, n_heads=4, seq_len=33, segment_len=8)
    raw["train"].update(micro_batch_size=3, global_batch_size=4)
    raw["train"].pop("grad_accum_steps", None)
    raw["parallel"] = {"sequence_parallel_size": 0}
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    msg = str(e.value)
    for part in ("d_model (30) must be divisible by n_heads (4)", "seq_len (33) must be a multiple of segment_len (8)",
                 "4 is not a multiple of micro_batch_size 3", "parallel.sequence_parallel_size"):
        assert part in msg, (part, msg)


def test_empty_output_dir_is_refused(ds, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_run_config(ds, tmp_path / "run")))
    err = _check_config_fails(capsys, ["--config", tmp_path / "run.yaml", "--set", "run.output_dir="])
    assert err.strip().splitlines()[1:] == ["  - run.output_dir (--set): must not be empty; give the run directory "
                                            "(e.g. runs/my_run)"]
    with pytest.raises(ConfigError, match="run.output_dir: must not be empty"):
        load_config(raw=tiny_run_config(ds, "  "))


def test_every_duplicate_key_and_bad_set_in_one_round(ds, tmp_path, capsys):
    text = yaml.safe_dump(tiny_run_config(ds, tmp_path / "run"), sort_keys=False)
    lines = text.splitlines()
    i, j = lines.index("  d_model: 32"), lines.index("  lr: 0.003")
    lines.insert(j + 1, "  lr: 0.1")
    lines.insert(i + 1, "  d_model: 64")
    (tmp_path / "dup.yaml").write_text("\n".join(lines) + "\n")
    err = _check_config_fails(capsys, ["--config", tmp_path / "dup.yaml", "--set", "train.warmup_steps"])
    assert err.strip().splitlines()[1:] == [
        f"  - line {i + 2}: not valid YAML: duplicate key 'd_model' (first given at line {i + 1}); keep one of them",
        f"  - line {j + 3}: not valid YAML: duplicate key 'lr' (first given at line {j + 2}); keep one of them",
        "  - --set train.warmup_steps: expected key.sub=value"]


def test_cross_field_rules_are_validators_and_reported_with_the_rest(ds, tmp_path):
    # the batch rule needs the layout (2 processes: data_parallel_size 2); max_steps and segment_len are wrong too
    raw = tiny_run_config(ds, tmp_path / "run", model={"segment_len": 5},
                          train={"max_steps": "many", "micro_batch_size": 3, "global_batch_size": 8})
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw, world_size=2)
    got = dict(ei.value.problems)
    assert set(got) == {"train.max_steps", "train.global_batch_size", "model"}, got
    assert got["train.global_batch_size"].startswith("train.global_batch_size=8 is not a positive multiple of "
                                                     "train.micro_batch_size=3 x data_parallel_size=2 (= 6)")
    assert got["model"] == "seq_len (16) must be a multiple of segment_len (5)"
    # the same rules as pydantic validators, given the layout as validation context
    from llp_pretrain.config import ParallelConfig, TrainConfig
    from llp_pretrain.layout import ParallelLayout
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a positive multiple"):
        TrainConfig.model_validate({"max_steps": 1, "micro_batch_size": 3, "global_batch_size": 8},
                                   context={"layout": ParallelLayout(2)})
    assert TrainConfig.model_validate({"max_steps": 1, "micro_batch_size": 3, "global_batch_size": 12},
                                      context={"layout": ParallelLayout(2)}).global_batch_size == 12
    with pytest.raises(ValidationError, match="world_size=3 is not divisible"):
        ParallelConfig.model_validate({"sequence_parallel_size": 2}, context={"world_size": 3})
    with pytest.raises(ValidationError, match="0.1 is above train.lr 0.01"):
        TrainConfig.model_validate({"max_steps": 1, "micro_batch_size": 1, "lr": 0.01, "min_lr": 0.1})


def test_run_config_model_is_typed(ds, tmp_path):
    from llp_pretrain.config import RunConfig
    from llp_pretrain.models import ModelConfig

    cfg = load_config(raw=tiny_run_config(ds, tmp_path / "run"))
    assert isinstance(cfg.model, ModelConfig) and RunConfig.model_fields["model"].annotation is ModelConfig
