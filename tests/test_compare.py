"""`llp-pretrain compare`: a tiny two-variant run produces the tables and plots, and every reported
number agrees with what the per-variant TensorBoard runs hold (read back here independently)."""
import gzip
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
KJV = REPO / "data_prep" / "data" / "kjv.txt.gz"


def _tb(run_dir: Path):
    out = {}
    for ev in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[e.step] = e.value
    return out


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    with gzip.open(KJV, "rt", encoding="utf-8") as f:
        text = "".join(line for _, line in zip(range(2500), f))
    corpus = tmp / "kjv_head.txt"
    corpus.write_text(text, encoding="utf-8")
    cfg = {
        "compare": {"variants": ["gpt", "perceiver_ar"], "param_tolerance": 0.05, "eval_stride": 16,
                    "cost_seq_lens": [64, 128], "cost_repeats": 1},
        "variant_overrides": {"perceiver_ar": {"latent_len": 32}},
        "model": {"vocab_size": "auto", "d_model": 32, "n_heads": 2, "n_layers": 1, "seq_len": 64,
                  "tie_embeddings": True},
        "data": {"path": str(tmp / "out" / "data" / "shards"),
                 "prepare": {"corpus": [str(corpus)], "vocab_size": 400, "val_fraction": 0.1,
                             "doc_sep": "blank-line"},
                 "num_workers": 0, "shuffle_buffer": 8, "val_samples": 4},
        "train": {"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 2, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 1, "precision": "fp32", "log_interval": 2, "eval_interval": 3,
                  "save_interval": 0, "keep_checkpoints": 1, "sample_tokens": 0},
        "deepspeed": str(REPO / "configs" / "deepspeed" / "zero0.json"),
        "run": {"output_dir": str(tmp / "out")},
    }
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "compare", "--config", str(path), "--steps", "4"],
                          capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "out", proc.stdout


@pytest.mark.timeout(700)
def test_compare_outputs_match_tensorboard(compare_run):
    out, stdout = compare_run
    res = json.loads((out / "results.json").read_text())
    assert list(res["variants"]) == ["gpt", "perceiver_ar"]
    md = (out / "results.md").read_text()
    for v in ("gpt", "perceiver_ar"):
        row = res["variants"][v]
        assert f"| {v} |" in md
        assert str(row["params"]) in stdout.replace(",", "")  # parameter counts are printed
        assert abs(row["params_rel_diff"]) <= 0.05
        tb = _tb(out / "runs" / v)
        # --steps 4 overrides the YAML's 6 for every variant
        assert max(tb["train/loss"]) == 4
        assert row["train_tokens"] == 4 * 2 * 64
        assert math.isclose(row["val_loss"], tb["eval/loss"][4], rel_tol=1e-6)
        assert math.isclose(row["val_ppl"], tb["eval/ppl"][4], rel_tol=1e-6)
        assert math.isclose(row["val_ppl"], math.exp(row["val_loss"]), rel_tol=1e-5)
        assert math.isclose(row["val_bits_per_byte"], tb["eval/bits_per_byte"][4], rel_tol=1e-6)
        # step time and throughput leave out the first log interval (warm-up): log_interval is capped
        # at steps/10 -> 1 here, so the intervals are the steps 2..4
        assert sorted(tb["train/step_time"]) == [1, 2, 3, 4]
        steady = [tb["train/step_time"][s] for s in (2, 3, 4)]
        assert math.isclose(row["step_time_s"], statistics.median(steady), rel_tol=1e-6)
        assert math.isclose(row["tokens_per_sec"], statistics.median(tb["train/tokens_per_sec"][s] for s in (2, 3, 4)),
                            rel_tol=1e-6)
        assert math.isclose(row["final_train_loss"], tb["train/loss"][4], rel_tol=1e-6)
        assert f"{row['val_ppl']:.3f}" in md
    # both variants scored the same number of held-out targets
    assert res["variants"]["gpt"]["val_tokens_scored"] == res["variants"]["perceiver_ar"]["val_tokens_scored"] > 0


@pytest.mark.timeout(700)
def test_compare_plots_hold_one_line_per_variant(compare_run):
    out, _ = compare_run
    for name in ("loss_curves.png", "cost_vs_seq_len.png"):
        img = Image.open(out / name)
        img.verify()  # a valid PNG
        img = Image.open(out / name)
        assert img.format == "PNG" and img.size[0] > 100
    series = json.loads(Image.open(out / "loss_curves.png").info["llp-pretrain:series"])
    assert sorted(series["train"]) == sorted(series["val"]) == ["gpt", "perceiver_ar"]
    for v, pts in series["train"].items():
        tb = _tb(out / "runs" / v)
        assert [(s * 2 * 64, x) for s, x in sorted(tb["train/loss"].items())] == [tuple(p) for p in pts]
        assert pts and all(b[0] > a[0] for a, b in zip(pts, pts[1:]))
    cost = json.loads(Image.open(out / "cost_vs_seq_len.png").info["llp-pretrain:series"])["cost"]
    assert sorted(cost) == ["gpt", "perceiver_ar"]
    assert all([p[0] for p in pts] == [64, 128] and all(p[1] > 0 for p in pts) for pts in cost.values())


def test_compare_figures_have_expected_lines(tmp_path):
    from llp_pretrain.compare import plot_cost, plot_loss_curves

    curves = {"a": {"train": [(1, 3.0), (2, 2.5)], "val": [(2, 2.7)]},
              "b": {"train": [(1, 3.1), (2, 2.4)], "val": [(2, 2.6)]},
              "c": {"train": [(1, 3.2)], "val": []}}
    fig = plot_loss_curves(curves, tmp_path / "l.png")
    train_ax, val_ax = fig.axes
    assert [l.get_label() for l in train_ax.get_lines()] == ["a", "b", "c"]
    assert [l.get_label() for l in val_ax.get_lines()] == ["a", "b"]  # no empty line for c
    assert list(train_ax.get_lines()[1].get_ydata()) == [3.1, 2.4]
    # the validation panel shares the train panel's loss axis (no zoom into its own narrow range) and
    # states the final values and their spread
    assert val_ax.get_ylim() == train_ax.get_ylim()
    assert val_ax.get_ylim()[1] - val_ax.get_ylim()[0] > 0.5
    note = "\n".join(t.get_text() for t in val_ax.texts)
    assert "a: 2.7000" in note and "b: 2.6000" in note and "spread 0.1000 nats" in note
    series = json.loads(Image.open(tmp_path / "l.png").info["llp-pretrain:series"])
    assert series["val_spread"] == pytest.approx(0.1)
    fig = plot_cost({"a": [(64, 0.1), (128, 0.3)], "b": [(64, 0.2)]}, tmp_path / "c.png")
    assert len(fig.axes[0].get_lines()) == 2


def test_steady_step_time_leaves_out_the_warm_up_interval():
    from llp_pretrain.compare import steady_median

    # a first interval of 3.2 s/step (warm-up) against 0.058 s/step later: the warm-up is not reported
    assert steady_median([(10, 3.2), (20, 0.058), (30, 0.06), (40, 0.057)]) == pytest.approx(0.058)
    assert steady_median([(20, 0.058), (10, 3.2)]) == pytest.approx(0.058)  # order of the pairs does not matter
    assert steady_median([(10, 3.2)]) is None  # nothing after the warm-up: n/a, not the warm-up time


def test_compare_yaml_with_duplicate_keys_is_refused(tmp_path):
    from llp_pretrain.compare import load_compare_config
    from llp_pretrain.config import ConfigError

    p = tmp_path / "c.yaml"
    p.write_text("compare:\n  variants: [gpt]\n  variants: [llp]\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'variants' \(first given at line 2\)"):
        load_compare_config(p)


def test_compare_rejects_unknown_variant(tmp_path):
    from llp_pretrain.compare import load_compare_config

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"compare": {"variants": ["gpt", "lpp"]}, "model": {}}))
    with pytest.raises(ValueError, match="lpp"):
        load_compare_config(p)
