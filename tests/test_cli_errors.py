"""Bad command-line values are refused with a message instead of being silently replaced
(found by trying the CLI as a new user)."""
import pytest
import torch

from llp_pretrain.cli import main as cli_main
from llp_pretrain.models import ModelConfig, build_model


def test_compare_refuses_an_empty_variant_list(capsys):
    assert cli_main(["compare", "--config", "configs/compare/kjv_tiny.yaml", "--variants", " , "]) == 2
    assert "--variants is empty" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, msg", [({"top_p": 2.0}, "top_p"), ({"top_p": 0.0}, "top_p"),
                                         ({"top_k": 0}, "top_k"), ({"temperature": -1.0}, "temperature")])
def test_generate_refuses_out_of_range_sampling_options(kwargs, msg):
    model = build_model(ModelConfig(variant="llp", vocab_size=20, d_model=8, n_heads=2, n_layers=1, seq_len=8,
                                    segment_len=4))
    with pytest.raises(ValueError, match=msg):
        model.generate(torch.tensor([1, 2, 3]), 4, **kwargs)
    assert model.generate(torch.tensor([1, 2, 3]), 4, top_p=1.0, top_k=1, temperature=0.0).shape == (7,)


# ---------------------------------------------------------------------------------------------
# every bad input ends in one line naming the file/key/value, exit status 2, no traceback

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from tiny_runs import tiny_run_config, write_tiny_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ZERO0 = str(REPO / "configs" / "deepspeed" / "zero0.json")


def _env():
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}


def _cli(*args, env=None, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "llp_pretrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or _env(), cwd=cwd)


def _one_line_error(proc, *needles, rc=2):
    """The process failed with ``rc`` and its stderr ends in one error line holding every needle."""
    assert proc.returncode == rc, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error" in last, proc.stderr[-2000:]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dataset and a ZeRO-2 run trained on it for 2 steps (checkpoint with recorded hashes;
    ZeRO 1-3 weights are read back through DeepSpeed's zero_to_fp32, which prints progress)."""
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_dataset(d / "ds", seq_len=16, train_samples=[8, 8], vocab_size=50)
    raw = tiny_run_config(d / "ds", d / "run", train={"max_steps": 2},
                          deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json"))
    (d / "run.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p = _cli("train", "--config", d / "run.yaml", cwd=d)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return d


def _main_error(capsys, argv, *needles, rc=2):
    """In-process ``llp-pretrain ARGV`` fails with ``rc`` and one stderr line holding every needle."""
    capsys.readouterr()
    try:
        got = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        got = e.code
    out, err = capsys.readouterr()
    assert got == rc, (got, out[-2000:], err[-2000:])
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


def test_train_with_a_full_disk_keeps_latest_and_says_so(tmp_path):
    """A real full file system: the run's checkpoints/ is a 600 KiB tmpfs (in a user + mount namespace,
    `unshare -rm`), which holds the first checkpoint (~400 KB) but not the second."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    write_tiny_dataset(tmp_path / "ds", seq_len=16, train_samples=[8, 8], vocab_size=50)
    raw = tiny_run_config(tmp_path / "ds", tmp_path / "run", deepspeed=ZERO0,
                          train={"max_steps": 4, "save_interval": 2, "keep_checkpoints": 1})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    script = (f"mount -t tmpfs -o size=600k tmpfs run/checkpoints || exit 99; "
              f"{sys.executable} -m llp_pretrain.cli train --config run.yaml > out.txt 2> err.txt; echo $? > rc.txt; "
              "cat run/checkpoints/latest > latest.txt; ls run/checkpoints > ls.txt")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=_env(), timeout=300,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "1", err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "no space left on the device holding" in last and "run/checkpoints" in last
    assert "step00000002 stays the latest checkpoint" in last and "--resume auto" in last
    assert (tmp_path / "latest.txt").read_text().strip() == "step00000002"
    # the half-written step00000004 was removed to give the space back
    assert (tmp_path / "ls.txt").read_text().split() == ["latest", "step00000002"]


def test_output_dir_that_is_a_file(tmp_path, tiny, capsys):
    (tmp_path / "afile").write_text("x")
    for out, needle in ((tmp_path / "afile", "exists and is not a directory"),
                        (tmp_path / "afile" / "run", f"{tmp_path / 'afile'} is a file")):
        raw = tiny_run_config(tiny / "ds", out, deepspeed=ZERO0)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        for cmd in ("check-config", "train"):
            assert cli_main([cmd, "--config", str(tmp_path / "c.yaml")]) == 2
            err = capsys.readouterr().err
            assert "run.output_dir (line" in err and needle in err and "Traceback" not in err


@pytest.mark.parametrize("content, needle", [
    ({"fp16": True}, '"fp16" must be a JSON object'),
    ({"zero_optimization": "three"}, '"zero_optimization" must be a JSON object'),
    ({"bf16": [1]}, '"bf16" must be a JSON object'),
    ({"zero_optimization": {"stage": 5}}, "stage 5 must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": "3"}}, 'stage "3" must be 0, 1, 2 or 3'),
    ([{"fp16": {"enabled": False}}], "the top level must be a JSON object"),
    # DeepSpeed's own model of the ZeRO section: what passes check-config also passes deepspeed.initialize
    ({"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}}, "zero_optimization.offload_optimizer"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}, "unable to parse string as an integer (got \"big\")"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "unknown key; did you mean 'overlap_comm'?"),
])
def test_deepspeed_json_sections_of_the_wrong_shape(tmp_path, tiny, capsys, content, needle):
    js = tmp_path / "ds.json"
    js.write_text(json.dumps(content))
    raw = tiny_run_config(tiny / "ds", tmp_path / "run", deepspeed=str(js))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    for cmd in ("check-config", "train"):  # train refuses it the same way, before any work
        assert cli_main([cmd, "--config", str(tmp_path / "c.yaml")]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(js) in err and "Traceback" not in err


def test_world_size_must_be_positive_and_world_size_env_an_integer(tmp_path, tiny, capsys, monkeypatch):
    raw = tiny_run_config(tiny / "ds", tmp_path / "run", deepspeed=ZERO0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    for bad, needle in (("0", "0 must be >= 1"), ("-2", "-2 must be >= 1"), ("two", "'two' is not an integer")):
        _main_error(capsys, ["check-config", "--config", cfg, "--world-size", bad], "argument --world-size", needle)
    for bad, needle in (("abc", "WORLD_SIZE='abc' is not an integer"), ("0", "WORLD_SIZE='0' must be >= 1")):
        monkeypatch.setenv("WORLD_SIZE", bad)
        for cmd in ("check-config", "train"):  # train refuses before starting any process group
            assert cli_main([cmd, "--config", str(cfg)]) == 2
            err = capsys.readouterr().err
            assert needle in err and "Traceback" not in err
    from llp_pretrain.config import ConfigError, load_config

    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="world_size: -1 must be a positive number of processes"):
        load_config(cfg, world_size=-1)


def test_yaml_not_utf8_names_the_file_and_line(tmp_path, tiny, capsys):
    raw = tiny_run_config(tiny / "ds", tmp_path / "run", deepspeed=ZERO0)
    text = yaml.safe_dump(raw, sort_keys=False).replace("sample_tokens: 0", "sample_prompt: \xe9t\xe9\n  sample_tokens: 0")
    path = tmp_path / "latin1.yaml"
    path.write_bytes(text.encode("latin-1"))
    line = text.splitlines().index("  sample_prompt: \xe9t\xe9") + 1
    assert cli_main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"line {line}: not UTF-8 text (byte 0xe9" in err and "Traceback" not in err


def test_duplicate_yaml_keys_are_an_error(tmp_path, tiny, capsys):
    raw = tiny_run_config(tiny / "ds", tmp_path / "run", deepspeed=ZERO0)
    lines = yaml.safe_dump(raw, sort_keys=False).splitlines()
    i = lines.index("  lr: 0.003")
    lines.insert(i + 2, "  lr: 0.1")  # the same key again, two lines later
    path = tmp_path / "dup.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert cli_main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"line {i + 3}: not valid YAML: duplicate key 'lr' (first given at line {i + 1})" in err
    # YAML merge keys may still be overridden (that is what they are for)
    from llp_pretrain.config import read_yaml_file

    (tmp_path / "merge.yaml").write_text("base: &b {lr: 1, wd: 2}\ntrain:\n  <<: *b\n  lr: 3\n")
    assert read_yaml_file(tmp_path / "merge.yaml")[0]["train"] == {"lr": 3, "wd": 2}


def test_eval_batch_size_and_split_choices(tiny, capsys):
    for args, needle in ((["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
                         (["--batch-size", "-3"], "argument --batch-size: -3 must be >= 1"),
                         (["--stride", "0"], "argument --stride: 0 must be >= 1"),
                         (["--split", "test"], "argument --split: invalid choice: 'test'")):
        _main_error(capsys, ["eval", "--checkpoint", tiny / "run", "--data", tiny / "ds", *args], needle)
    from llp_pretrain.cli import evaluate_checkpoint

    with pytest.raises(ValueError, match="batch size 0 must be >= 1"):
        evaluate_checkpoint(str(tiny / "run"), str(tiny / "ds"), batch_size=0)


def test_eval_refuses_data_from_another_tokenizer_before_scoring(tmp_path, tiny, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny / "ds", other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    _main_error(capsys, ["eval", "--checkpoint", tiny / "run", "--data", other, "--json"],
                str(other / "manifest.json"), "tokenizer sha256 000000000000", "trained with synthetic")
    # the same for an exported directory, which carries the run's hashes
    exp = tmp_path / "exp"
    assert cli_main(["export", str(tiny / "run"), str(exp)]) == 0
    assert json.loads((exp / "hashes.json").read_text())["tokenizer_manifest_sha256"] == "synthetic"
    _main_error(capsys, ["eval", "--checkpoint", exp, "--data", other], "tokenizer sha256 000000000000")
    assert cli_main(["eval", "--checkpoint", str(exp), "--data", str(tiny / "ds"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_eval_json_stdout_is_only_the_result(tiny):
    """Library chatter (DeepSpeed's accelerator notice, zero_to_fp32's "Processing zero checkpoint")
    goes to stderr: a real process, whose stdout must parse as one JSON object."""
    p = _cli("eval", "--checkpoint", tiny / "run", "--data", tiny / "ds", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)  # the whole stdout is one JSON object
    assert set(res) == {"tokens", "loss", "ppl", "bits_per_byte"}
    assert "Processing zero checkpoint" in p.stderr  # the chatter is still there, on stderr


def test_generate_tokenizer_must_be_a_sentencepiece_model(tmp_path, tiny, capsys):
    (tmp_path / "notamodel.txt").write_text("hello")
    for tok, needle in ((tmp_path, "is a directory; give the tokenizer.model file"),
                        (tmp_path / "missing.model", "no such file"),
                        (tmp_path / "notamodel.txt", "is not a SentencePiece model")):
        _main_error(capsys, ["generate", "--checkpoint", tiny / "run", "--prompt", "x", "--tokenizer", tok],
                    str(tok), needle)


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    import tempfile

    d = tempfile.mkdtemp()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", d], check=True)
    os.rmdir(d)
    return ok


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a small tmpfs (a real full file system)")
@pytest.mark.parametrize("fills_at", ["weights", "after-weights", "over-an-earlier-export"])
def test_export_on_a_full_disk_leaves_nothing_half_written(tmp_path, tiny, capsys, fills_at):
    """A full disk during `export` (it was a safetensors traceback, then an empty OUT, and a failure
    after the weights left new weights next to an earlier export's config): one line naming OUT,
    exit 1, no OUT created, an earlier export unchanged, no temporary left; with space freed the
    same command works."""
    ref = tmp_path / "ref"
    assert cli_main(["export", str(tiny / "run"), str(ref)]) == 0
    weight_pages = -(-(ref / "model.safetensors").stat().st_size // 4096)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={weight_pages * 4096 + (256 << 10)}", "tmpfs", str(disk)],
                   check=True)
    try:
        out = disk / "exp"
        before = None
        if fills_at == "over-an-earlier-export":
            assert cli_main(["export", str(tiny / "run"), str(out)]) == 0
            (out / "model_config.json").write_text('{"earlier": true}')   # tell the earlier export apart
            (out / "model.safetensors").write_bytes(b"earlier weights")
            before = {p.name: p.read_bytes() for p in out.iterdir()}
        st = os.statvfs(disk)
        free = 0 if fills_at == "weights" else weight_pages * 4096
        (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free))
        capsys.readouterr()
        _main_error(capsys, ["export", tiny / "run", out], "no space left on the device holding", str(out), rc=1)
        if before is None:
            assert not out.exists()
        else:
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        (disk / "filler").unlink()
        assert cli_main(["export", str(tiny / "run"), str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
        from safetensors.torch import load_file

        got, want = (load_file(str(d / "model.safetensors")) for d in (out, ref))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        del got, want   # they map the files: the tmpfs could not be unmounted
    finally:
        if subprocess.run(["umount", str(disk)]).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)   # busy: detach it anyway


@pytest.mark.parametrize("key, value, named", [("zero_stage", "abc", 'zero_stage is "abc"'),
                                                ("model", "x", 'model is "x"'),
                                                ("model.d_model", "big", "d_model: Input should be a valid integer")])
def test_damaged_run_meta_fields_are_named(tmp_path, tiny, capsys, key, value, named):
    """run_meta.json with a wrong type gave "invalid literal for int()" or pydantic's multi-line text."""
    run = tmp_path / "run"
    shutil.copytree(tiny / "run", run)
    meta_file = next(run.glob("checkpoints/step*/run_meta.json"))
    meta = json.loads(meta_file.read_text())
    if key.startswith("model."):
        meta["model"][key.split(".", 1)[1]] = value
    else:
        meta[key] = value
    meta_file.write_text(json.dumps(meta))
    line = _main_error(capsys, ["export", run, tmp_path / "exp"], named, "damaged")
    assert str(meta_file.parent) in line and len(line.splitlines()) == 1


def test_a_model_too_large_for_memory_is_one_line(tmp_path, tiny):
    """d_model 1e9 passes the config checks and then could not be allocated: it was a DefaultCPUAllocator
    traceback."""
    raw = tiny_run_config(tiny / "ds", tmp_path / "run", deepspeed=ZERO0,
                          model={"d_model": 1_000_000_000, "n_heads": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    p = _cli("train", "--config", tmp_path / "c.yaml", timeout=300)
    _one_line_error(p, "out of memory", "model.d_model", rc=1)


def test_generate_seed_out_of_range_is_refused(capsys):
    """--seed 1e23 was "Overflow when unpacking long long" (no option named)."""
    _main_error(capsys, ["generate", "--checkpoint", "x", "--prompt", "y", "--seed", str(10 ** 23)],
                "argument --seed", "must be <= 9223372036854775807")


def test_export_refuses_an_existing_file_and_writes_normal_permissions(tmp_path, tiny, capsys):
    target = tmp_path / "model.bin"
    target.write_text("precious")
    _main_error(capsys, ["export", tiny / "run", target], str(target), "exists and is not a directory")
    assert target.read_text() == "precious"
    _main_error(capsys, ["export", tiny / "run", target / "sub"], f"{target} is a file; choose a directory path")
    old = os.umask(0o022)
    try:
        assert cli_main(["export", str(tiny / "run"), str(tmp_path / "exp")]) == 0
    finally:
        os.umask(old)
    assert capsys.readouterr().out.startswith("wrote ")
    for f in ("model.safetensors", "model_config.json", "hashes.json"):
        assert stat.S_IMODE((tmp_path / "exp" / f).stat().st_mode) == 0o644, f


def test_output_paths_under_a_file_are_refused_up_front(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    under = tmp_path / "afile" / "out"
    _main_error(capsys, ["quickstart", "--out", under, "--steps", "1"], "--out:", f"{tmp_path / 'afile'} is a file")
    _main_error(capsys, ["compare", "--config", "configs/compare/kjv_tiny.yaml", "--out", under],
                "--out:", f"{tmp_path / 'afile'} is a file")


def test_os_errors_are_one_line_with_the_path_and_what_to_do():
    import errno

    from llp_pretrain.cli import _os_error_line

    assert _os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/f/y")) == \
        "/x/f/y: Not a directory; a part of this path is a file; choose another path"
    assert _os_error_line(PermissionError(errno.EACCES, "Permission denied", "/r")).startswith(
        "/r: Permission denied; no permission")
    assert _os_error_line(OSError(errno.ENOSPC, "No space left on device", "/d/f")) == \
        "no space left on the device holding /d/f; free space and rerun"


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from llp_pretrain.cli import build_parser

    ap = build_parser()
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)][0]  # noqa: SLF001
    assert set(subs.choices) == {"train", "check-config", "eval", "generate", "export", "quickstart", "compare",
                                 "harness"}
    for name, sp in subs.choices.items():
        text = sp.format_help()
        for act in sp._actions:  # noqa: SLF001
            if act.help == argparse.SUPPRESS or isinstance(act, argparse._HelpAction):  # noqa: SLF001
                continue
            assert act.help, (name, act.dest)
            shown = sp.formatter_class(prog="x")._get_help_string(act)  # noqa: SLF001
            if act.option_strings:
                assert "default" in shown or "(required)" in shown, (name, act.dest, shown)
                if act.default not in (None, False, [], argparse.SUPPRESS):
                    assert "%(default)s" in shown or str(act.default) in shown, (name, act.dest, shown)
            assert (act.option_strings[0] if act.option_strings else act.dest) in text
    assert "(default: 8)" in " ".join(subs.choices["eval"].format_help().split())


def test_version(capsys):
    with pytest.raises(SystemExit) as ei:
        cli_main(["--version"])
    out = capsys.readouterr().out
    assert ei.value.code == 0 and out.startswith("llp-pretrain 0.") and "torch" in out


@pytest.mark.timeout(900)
def test_start_up_notices_are_printed_once_not_per_rank(tmp_path):
    """Two ranks under torchrun: DeepSpeed's accelerator notice and its comm-op notice appear once
    (rank 0), not once per rank; the run's own console lines too."""
    write_tiny_dataset(tmp_path / "ds", seq_len=16, train_samples=[8, 8], vocab_size=50)
    raw = tiny_run_config(tmp_path / "ds", tmp_path / "run", deepspeed=ZERO0, train={"max_steps": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "llp_pretrain.cli", "train",
                        "--config", str(tmp_path / "run.yaml")], capture_output=True, text=True, env=_env(),
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    both = p.stdout + p.stderr
    assert both.count("Setting accelerator to CPU") == 1, both
    assert both.count("deepspeed_shm_comm_op built successfully") <= 1, both
    assert both.count("| world 2 (dp 2 x sp 1)") == 1 and both.count("step       2/2") == 1, both
