"""``llp-pretrain compare``: train several variants side by side on the same data and compare them.

Every selected variant gets the same tokenizer, shards, ``seq_len``, optimizer, LR schedule, seed,
number of steps and global batch (so the same number of training tokens). Widths are matched so
parameter counts agree within ``compare.param_tolerance`` (default 5 %) of the reference variant
(``gpt`` when selected, else the first): for each variant the ``d_model`` (a multiple of
``2 * n_heads``, RoPE needs an even head width) whose parameter count is closest is taken.

Each variant trains in its own process (``llp-pretrain train``, so one variant's memory or
DeepSpeed state never leaks into the next) with its TensorBoard run under ``RUN/runs/<variant>/``,
so ``tensorboard --logdir RUN/runs`` overlays all of them. Then each is evaluated on the held-out
split with the strided evaluation of :mod:`llp_pretrain.evaluate`, scoring *the same targets* for
every variant: only the last ``T`` positions of each window are scored, ``T`` = the fewest trained
positions of any selected variant (``latent_len`` for the PerceiverAR family, ``seq_len`` for
``gpt``/``llp``), with ``stride <= T``. The evaluation is logged to the variant's TensorBoard run as
``eval/loss``, ``eval/ppl`` and ``eval/bits_per_byte``, and every number of the results table is
read back from those TensorBoard runs. Training step time and tokens/s are medians over the log
intervals after the first one (which holds the warm-up); ``train.log_interval`` is capped at
``max_steps / 10`` so that there are such intervals.

Outputs in the run directory: ``results.json``, ``results.md``, ``loss_curves.png`` (train loss and the
in-training validation loss, ``train/loss`` and ``val/loss`` of the TensorBoard runs, against training
tokens, on one shared loss axis with the final values and their spread written in the validation panel;
the table's validation numbers are the final strided evaluation), ``cost_vs_seq_len.png`` (median forward+backward step time of one
window against ``seq_len``, measured in this process for every variant side by side). The PNGs carry
the plotted series as JSON in the PNG text chunk ``llp-pretrain:series``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_prep.atomic import write_atomic, write_json_atomic
from llp_pretrain.models import VARIANTS

__all__ = ["CompareSpec", "load_compare_config", "match_widths", "run_compare", "plot_loss_curves",
           "plot_cost", "read_scalars", "SERIES_KEY"]

#: PNG text-chunk key holding the plotted series (JSON), so tests check data, not pixels.
SERIES_KEY = "llp-pretrain:series"
#: keys of the compare YAML that are not part of a run config
COMPARE_KEYS = ("compare", "variant_overrides")


class DataPrepSpec(BaseModel):
    """``data.prepare``: build the tokenizer and shards when ``data.path`` has no manifest.

    ``corpus``: ``bundled`` (the packaged King James Bible) or file/directory paths; other
    fields as in ``llp-prep`` (``vocab_size`` pieces, ``val_fraction`` of documents)."""

    model_config = ConfigDict(extra="forbid")
    corpus: List[str] = Field(default_factory=lambda: ["bundled"])
    vocab_size: int = Field(default=4000, gt=0)
    model_type: str = "bpe"
    doc_sep: str = "blank-line"
    val_fraction: float = Field(default=0.02, gt=0, lt=1)
    samples_per_shard: int = Field(default=256, gt=0)
    max_sentences: int = Field(default=200_000, gt=0)


class CompareSpec(BaseModel):
    """The ``compare`` section.

    Fields: ``variants`` to train (default all six); ``steps`` (overrides ``train.max_steps``);
    ``param_tolerance`` (relative, 0.05 = 5 %); ``eval_stride`` (tokens; default the scored length
    ``T``); ``eval_max_samples`` (cap on val samples, None = all); ``cost_seq_lens`` (window lengths
    of the step-time sweep) with ``cost_repeats`` timed repeats (median) at ``cost_batch`` windows."""

    model_config = ConfigDict(extra="forbid")
    variants: List[str] = Field(default_factory=lambda: list(VARIANTS))
    steps: Optional[int] = Field(default=None, gt=0)
    param_tolerance: float = Field(default=0.05, gt=0)
    eval_stride: Optional[int] = Field(default=None, gt=0)
    eval_max_samples: Optional[int] = Field(default=None, gt=0)
    cost_seq_lens: List[int] = Field(default_factory=lambda: [512, 1024, 2048])
    cost_repeats: int = Field(default=3, gt=0)
    cost_batch: int = Field(default=1, gt=0)


def _bad(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def load_compare_config(path: str | os.PathLike, variants: Optional[Sequence[str]] = None,
                        steps: Optional[int] = None) -> Tuple[CompareSpec, Dict[str, Dict], Dict, Optional[DataPrepSpec]]:
    """Read a compare YAML: ``(spec, variant_overrides, base_run_config_dict, prepare_spec)``.

    The base run config is the YAML without ``compare``/``variant_overrides`` and without
    ``data.prepare``; its ``deepspeed`` path is made absolute relative to the YAML.

    Raises:
        FileNotFoundError: the YAML does not exist.
        ValueError: unknown variants or invalid ``compare`` / ``data.prepare`` fields (named).
    """
    from llp_pretrain.config import find_config_file, read_yaml_file

    src = find_config_file(str(path))
    raw = read_yaml_file(src)[0] or {}  # UTF-8, no duplicate keys; ConfigError names file and line
    if not isinstance(raw, dict):
        raise _bad(str(src), "a compare config must be a mapping of sections")
    try:
        spec = CompareSpec.model_validate(raw.get("compare") or {})
    except ValidationError as e:
        raise _bad(str(src), f"invalid 'compare' section: {e}") from e
    if variants:
        spec.variants = list(variants)
    if steps:
        spec.steps = steps
    unknown = [v for v in spec.variants if v not in VARIANTS]
    if unknown or not spec.variants:
        raise _bad(str(src), f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(spec.variants)) != len(spec.variants):
        raise _bad(str(src), f"variants repeat: {spec.variants}")
    overrides = raw.get("variant_overrides") or {}
    bad = [k for k in overrides if k not in VARIANTS]
    if bad:
        raise _bad(str(src), f"variant_overrides has unknown variants {bad}")
    base = {k: copy.deepcopy(v) for k, v in raw.items() if k not in COMPARE_KEYS}
    prep = None
    data = base.get("data") or {}
    if isinstance(data, dict) and "prepare" in data:
        try:
            prep = DataPrepSpec.model_validate(data.pop("prepare") or {})
        except ValidationError as e:
            raise _bad(str(src), f"invalid 'data.prepare': {e}") from e
    ds = base.get("deepspeed")
    if isinstance(ds, str):
        base["deepspeed"] = str(find_config_file(ds, relative_to=src.parent))
    return spec, overrides, base, prep


# --------------------------------------------------------------------------------------------
# data

def prepare_data(out_dir: Path, prep: DataPrepSpec, seq_len: int, quiet: bool = True) -> Path:
    """Tokenizer + shards for the comparison under ``out_dir`` (reused when already complete).

    Returns the shard directory (holding ``manifest.json``)."""
    from data_prep import BUNDLED_CORPUS
    from llp_pretrain.prepare import prepare_dataset

    corpus = [str(BUNDLED_CORPUS) if c == "bundled" else c for c in prep.corpus]
    paths = prepare_dataset(out_dir, seq_len, corpus=corpus, vocab_size=prep.vocab_size, model_type=prep.model_type,
                            doc_sep=prep.doc_sep, val_fraction=prep.val_fraction,
                            samples_per_shard=prep.samples_per_shard, max_sentences=prep.max_sentences,
                            log=(lambda msg: None) if quiet else (lambda msg: print(f"[compare] {msg}", flush=True)))
    return paths["shards"]


# --------------------------------------------------------------------------------------------
# width matching

def variant_model(base_model: Dict[str, Any], variant: str, overrides: Dict[str, Dict],
                  seq_len: Optional[int] = None) -> Dict[str, Any]:
    """The model dict of ``variant``: the shared ``model`` section, the variant's overrides, and
    ``variant``. With ``seq_len`` given (the cost sweep), lengths tied to the window scale with it:
    ``latent_len`` and ``compression_len`` keep their fraction of ``seq_len``, and
    ``history_segments`` is reduced until it divides the history; ``segment_len`` stays fixed."""
    m = dict(base_model)
    m.update(overrides.get(variant) or {})
    m["variant"] = variant
    keep = {"gpt": (), "llp": ("segment_len", "n_segments"),
            "perceiver_ar": ("latent_len",), "history_self_attention": ("latent_len",),
            "compressed_history": ("latent_len", "compression_len"),
            "segmented_history": ("latent_len", "history_segments")}[variant]
    for k in ("latent_len", "segment_len", "n_segments", "compression_len", "history_segments"):
        if k not in keep:
            m.pop(k, None)
    if seq_len is not None and seq_len != m["seq_len"]:
        scale = seq_len / m["seq_len"]
        for k in ("latent_len", "compression_len"):
            if m.get(k):
                m[k] = max(1, int(round(m[k] * scale)))
        if variant == "llp":  # keep the segment length, let the count follow the window
            m["segment_len"] = m.get("segment_len") or m["seq_len"] // m["n_segments"]
            m.pop("n_segments", None)
        m["seq_len"] = seq_len
        if m.get("history_segments"):
            h = seq_len - m["latent_len"]
            k = m["history_segments"]
            while h % k:
                k -= 1
            m["history_segments"] = k
    return m


def _param_count(model_dict: Dict[str, Any]) -> int:
    from llp_pretrain.models import ModelConfig, build_model

    return build_model(ModelConfig(**model_dict)).num_params()


def match_widths(model_dicts: Dict[str, Dict[str, Any]], tolerance: float,
                 reference: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Pick per-variant ``d_model`` so parameter counts agree with the reference variant's.

    Args:
        model_dicts: variant -> model dict at the shared ``d_model``.
        tolerance: allowed relative difference (0.05 = 5 %).
        reference: the variant whose count is the target (default ``gpt`` if present, else the
            first).

    Returns:
        variant -> ``{"model": dict, "params": int, "rel_diff": float}``.

    Raises:
        ValueError: a variant cannot get within ``tolerance`` (names it, with its best count).
    """
    ref = reference or ("gpt" if "gpt" in model_dicts else next(iter(model_dicts)))
    target = _param_count(model_dicts[ref])
    out: Dict[str, Dict[str, Any]] = {}
    for v, md in model_dicts.items():
        step = 2 * md["n_heads"]
        d0 = md["d_model"]
        best = None
        for d in range(max(step, (d0 // 2) // step * step), 2 * d0 + step, step):
            cand = dict(md, d_model=d)
            try:
                n = _param_count(cand)
            except Exception:
                continue
            if best is None or abs(n - target) < abs(best[1] - target):
                best = (cand, n)
        if v == ref:
            best = (md, target)
        rel = (best[1] - target) / target
        if abs(rel) > tolerance:
            raise ValueError(f"variant {v}: closest parameter count {best[1]:,} (d_model {best[0]['d_model']}) is "
                             f"{rel:+.1%} off {ref}'s {target:,}; loosen compare.param_tolerance or change the "
                             f"variant's overrides")
        out[v] = {"model": best[0], "params": best[1], "rel_diff": rel}
    return out


# --------------------------------------------------------------------------------------------
# TensorBoard read-back

def read_scalars(tb_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """All scalars of one TensorBoard run directory: tag -> sorted ``[(step, value), ...]``.

    Several event files (e.g. training, then the comparison's eval) are merged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Dict[str, Dict[int, float]] = {}
    for ev in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[e.step] = e.value
    return {t: sorted(d.items()) for t, d in out.items()}


# --------------------------------------------------------------------------------------------
# evaluation and cost sweep

def evaluate_run(run_dir: Path, data_dir: Path, scored_len: int, stride: int,
                 max_samples: Optional[int] = None, batch_size: int = 4):
    """Strided evaluation of a run's latest checkpoint on ``val``, scoring the last ``scored_len``
    positions of every window (so all compared variants score the same targets)."""
    import torch

    from llp_pretrain.config import read_manifest
    from llp_pretrain.data import read_split_stream
    from llp_pretrain.evaluate import bytes_per_token, score_windows, summarize, window_plan
    from llp_pretrain.export import load_model

    model, mcfg, _ = load_model(run_dir)
    manifest = read_manifest(data_dir)
    n = int(mcfg["seq_len"])
    stream = read_split_stream(data_dir, "val", manifest, max_samples=max_samples)
    plan = window_plan(len(stream), n, stride, scored_len)
    with torch.no_grad():
        nll, count = score_windows(lambda x: model(x)[:, -scored_len:], torch.from_numpy(stream), plan, n,
                                   scored_len, batch_size)
    return summarize(nll, count, bytes_per_token(manifest, "val"))


def step_time(model_dict: Dict[str, Any], batch: int, repeats: int, seed: int = 0) -> float:
    """Median wall seconds of one forward+backward+zero_grad of a ``(batch, seq_len)`` window."""
    import torch

    from llp_pretrain.models import ModelConfig, build_model, lm_loss

    torch.manual_seed(seed)
    cfg = ModelConfig(**model_dict)
    model = build_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1))
    times = []
    for i in range(repeats + 1):  # first call warms up
        t0 = time.perf_counter()
        loss_sum, n = lm_loss(model, tokens)
        (loss_sum / n).backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# plots

def _save(fig, path: Path, series: Dict[str, Any]) -> None:
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, metadata={SERIES_KEY: json.dumps(series)}))


def val_spread(curves: Dict[str, Dict[str, List[Tuple[float, float]]]]) -> Optional[float]:
    """Largest minus smallest final validation loss across variants (nats), None with fewer than two."""
    last = [c["val"][-1][1] for c in curves.values() if c.get("val")]
    return max(last) - min(last) if len(last) > 1 else None


def plot_loss_curves(curves: Dict[str, Dict[str, List[Tuple[float, float]]]], path: Path):
    """``curves[variant] = {"train": [(tokens, loss)...], "val": [...]}`` -> two panels, one line
    per variant in each, on one shared loss axis: the validation panel is not zoomed into its own
    narrow range (which would draw a 0.01-nat difference as a wide gap); it lists the final values
    and their spread instead. Returns the matplotlib Figure (also saved to ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("train", "val")):
        for v, c in curves.items():
            pts = c.get(kind) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, marker="o" if kind == "val" else None,
                        markersize=3)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"{kind} loss (nats/token)")
        ax.set_title(f"{kind} loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[1].yaxis.set_tick_params(labelleft=True)
    spread = val_spread(curves)
    final = [f"{v}: {c['val'][-1][1]:.4f}" for v, c in curves.items() if c.get("val")]
    if final:
        note = "final val loss (nats)\n" + "\n".join(final)
        if spread is not None:
            note += f"\nspread {spread:.4f} nats"
        axes[1].text(0.03, 0.03, note, transform=axes[1].transAxes, fontsize=8, family="monospace",
                     va="bottom", ha="left", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    fig.tight_layout()
    _save(fig, path, {"train": {v: c.get("train", []) for v, c in curves.items()},
                      "val": {v: c.get("val", []) for v, c in curves.items()}, "val_spread": spread})
    return fig


def plot_cost(cost: Dict[str, List[Tuple[int, float]]], path: Path):
    """``cost[variant] = [(seq_len, seconds)...]`` -> step time against ``seq_len`` (log-log), one
    line per variant. Returns the Figure (also saved to ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for v, pts in cost.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, marker="o", markersize=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("seq_len (tokens)")
    ax.set_ylabel("forward+backward seconds per window")
    ax.set_title("step time against seq_len")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, {"cost": cost})
    return fig


# --------------------------------------------------------------------------------------------
# the run

def _median(pairs: List[Tuple[int, float]]) -> Optional[float]:
    vals = [v for _, v in pairs if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def steady_median(pairs: List[Tuple[int, float]]) -> Optional[float]:
    """Median of per-log-interval values without the first interval, which holds the warm-up (first
    DeepSpeed step, kernel probes, allocator growth); None when no later interval was logged."""
    return _median(sorted(pairs)[1:])


def _last(pairs: List[Tuple[int, float]]) -> Optional[float]:
    return pairs[-1][1] if pairs else None


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(rows: Dict[str, Dict[str, Any]], cost: Dict[str, List[Tuple[int, float]]]) -> List[str]:
    """The paper's claims, checked on this run's numbers (reported whatever the outcome)."""
    out = []
    llp = rows.get("llp")
    if llp is None:
        return ["LLP was not among the variants: no verdict."]
    par = rows.get("perceiver_ar")
    if par is not None:
        yes = llp["val_ppl"] < par["val_ppl"]
        out.append(f"LLP validation perplexity {llp['val_ppl']:.3f} is {'below' if yes else 'NOT below'} "
                   f"PerceiverAR's {par['val_ppl']:.3f}.")
    gpt = rows.get("gpt")
    if gpt is not None:
        rel = llp["val_ppl"] / gpt["val_ppl"] - 1
        out.append(f"LLP validation perplexity is {rel:+.1%} relative to gpt's {gpt['val_ppl']:.3f} "
                   f"({'within' if rel <= 0.05 else 'NOT within'} 5%).")
        long = [(n, t) for n, t in cost.get("llp", []) if n >= 2048]
        g = dict(cost.get("gpt", []))
        for n, t in long:
            if n in g:
                out.append(f"At seq_len {n}, LLP takes {t * 1e3:.1f} ms per window vs gpt's {g[n] * 1e3:.1f} ms "
                           f"({t / g[n]:.2f}x: {'less' if t < g[n] else 'NOT less'} time per step).")
        if not long:
            out.append("No cost measurement at seq_len >= 2048 (add one to compare.cost_seq_lens).")
    return out


@dataclass
class _ComparePlan:
    """Everything fixed before training: the run directory, the data, and one validated run config
    per variant (``run_cfgs``) at the width ``matched`` by :func:`match_widths`."""

    spec: CompareSpec
    run_dir: Path
    data_dir: Path
    seq_len: int
    matched: Dict[str, Dict[str, Any]]
    run_cfgs: Dict[str, Any]
    cfg_dir: Path


def _prepare_base(spec: CompareSpec, base: Dict, prep: Optional[DataPrepSpec], run_dir: Path,
                  say: Callable[..., None]) -> Path:
    """Fill ``base`` in place: the data path (prepared under ``run_dir/data`` when ``prep`` is given and
    ``data.path`` has no manifest; made absolute), ``train.max_steps`` from ``spec.steps``, and
    ``train.log_interval`` capped at ``max_steps / 10``. Returns the resolved data directory."""
    seq_len = int(base["model"]["seq_len"])
    data = base.setdefault("data", {})
    if prep is not None and not (Path(str(data.get("path", ""))) / "manifest.json").is_file():
        say(f"[compare] preparing tokenizer and shards under {run_dir / 'data'}")
        data["path"] = str(prepare_data(run_dir / "data", prep, seq_len))
    data_dir = Path(data["path"]).resolve()
    data["path"] = str(data_dir)
    if spec.steps:
        base.setdefault("train", {})["max_steps"] = spec.steps
    tr = base.setdefault("train", {})
    if isinstance(tr.get("max_steps"), int) and isinstance(tr.get("log_interval", 10), int):
        # enough log intervals after the first (warm-up) one for a steady step time
        tr["log_interval"] = max(1, min(tr.get("log_interval", 10), tr["max_steps"] // 10))
    return data_dir


def _plan_variants(spec: CompareSpec, overrides: Dict[str, Dict], base: Dict, run_dir: Path, data_dir: Path,
                   say: Callable[..., None]) -> _ComparePlan:
    """One validated run config per variant, all before any training starts: widths matched, each
    config written to ``run_dir/configs/<variant>.yaml``, the parameter table printed.

    Raises:
        ValueError: a variant's parameter count cannot be matched (from :func:`match_widths`).
        ConfigError: a variant's run config is invalid (names every problem).
    """
    from llp_pretrain.config import load_config, read_manifest

    manifest = read_manifest(data_dir)
    piece_count = int(manifest["tokenizer"]["piece_count"])
    model_base = dict(base["model"])
    if model_base.get("vocab_size") in (None, "auto"):
        model_base["vocab_size"] = piece_count
    per_variant = {v: variant_model(model_base, v, overrides) for v in spec.variants}
    matched = match_widths(per_variant, spec.param_tolerance)
    cfg_dir = run_dir / "configs"
    cfg_dir.mkdir(exist_ok=True)
    run_cfgs = {}
    for v in spec.variants:
        raw = copy.deepcopy(base)
        raw["model"] = matched[v]["model"]
        raw.setdefault("run", {})["output_dir"] = str((run_dir / "runs" / v).resolve())
        cfg = load_config(raw=raw)  # raises ConfigError naming every problem
        path = cfg_dir / f"{v}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        run_cfgs[v] = cfg
    say("[compare] parameters (matched within {:.0%}):".format(spec.param_tolerance))
    for v in spec.variants:
        say(f"  {v:24s} d_model {matched[v]['model']['d_model']:5d}  params {matched[v]['params']:>12,}  "
            f"({matched[v]['rel_diff']:+.2%})")
    return _ComparePlan(spec, run_dir, data_dir, int(base["model"]["seq_len"]), matched, run_cfgs, cfg_dir)


def _train_variants(plan: _ComparePlan, say: Callable[..., None]) -> Dict[str, float]:
    """Train every variant in its own ``llp-pretrain train`` process (output in ``run_dir/logs/<variant>.log``,
    the launcher's rank variables removed from its environment). Returns variant -> wall seconds.

    Raises:
        RuntimeError: a training process exited non-zero (its log file is named).
    """
    logs = plan.run_dir / "logs"
    logs.mkdir(exist_ok=True)
    wall: Dict[str, float] = {}
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for v in plan.spec.variants:
        say(f"[compare] training {v} ({plan.run_cfgs[v].train.max_steps} steps) -> {plan.run_dir / 'runs' / v}")
        t0 = time.time()
        with open(logs / f"{v}.log", "w") as fh:
            rc = subprocess.call([sys.executable, "-m", "llp_pretrain.cli", "train", "--config",
                                  str(plan.cfg_dir / f"{v}.yaml"), "--resume", "auto"],
                                 stdout=fh, stderr=subprocess.STDOUT, env=env)
        wall[v] = time.time() - t0
        if rc != 0:
            raise RuntimeError(f"training {v} failed with exit code {rc}; see {logs / (v + '.log')}")
    return wall


def _evaluate_variants(plan: _ComparePlan, say: Callable[..., None]) -> Tuple[int, int]:
    """Strided evaluation on the same targets for every variant, logged to each TensorBoard run as
    ``eval/loss``, ``eval/ppl``, ``eval/bits_per_byte`` (when known) and ``eval/tokens`` at the final
    step. Returns ``(scored_len, stride)`` in tokens: the fewest trained positions of any variant, and
    ``compare.eval_stride`` capped at it."""
    from torch.utils.tensorboard import SummaryWriter

    from llp_pretrain.models import ModelConfig, build_model

    spec, run_dir = plan.spec, plan.run_dir
    trained = {v: build_model(ModelConfig(**plan.matched[v]["model"])).trained_positions(plan.seq_len)
               for v in spec.variants}
    scored_len = min(s.stop - s.start for s in trained.values())
    stride = min(spec.eval_stride or scored_len, scored_len)
    for v in spec.variants:
        say(f"[compare] evaluating {v} (scored positions per window {scored_len}, stride {stride})")
        res = evaluate_run(run_dir / "runs" / v, plan.data_dir, scored_len, stride, spec.eval_max_samples)
        steps_done = plan.run_cfgs[v].train.max_steps
        w = SummaryWriter(str(run_dir / "runs" / v / "tensorboard"), filename_suffix=".compare-eval")
        w.add_scalar("eval/loss", res.loss, steps_done)
        w.add_scalar("eval/ppl", res.ppl, steps_done)
        if res.bits_per_byte is not None:
            w.add_scalar("eval/bits_per_byte", res.bits_per_byte, steps_done)
        w.add_scalar("eval/tokens", res.tokens, steps_done)
        w.close()
    return scored_len, stride


def _measure_cost(plan: _ComparePlan, say: Callable[..., None]) -> Dict[str, List[Tuple[int, float]]]:
    """Step time against ``seq_len``, side by side in this process: variant -> ``[(seq_len, seconds)...]``.
    A length a variant cannot take (e.g. too short for its latents) is reported and skipped."""
    spec = plan.spec
    cost: Dict[str, List[Tuple[int, float]]] = {v: [] for v in spec.variants}
    for n in spec.cost_seq_lens:
        for v in spec.variants:
            md = variant_model(plan.matched[v]["model"], v, {}, seq_len=n)
            try:
                t = step_time(md, spec.cost_batch, spec.cost_repeats)
            except Exception as e:  # a length the variant cannot take (e.g. too short for its latents)
                say(f"  cost {v} seq_len {n}: skipped ({e})")
                continue
            cost[v].append((n, t))
            say(f"  cost {v:24s} seq_len {n:6d}: {t * 1e3:9.1f} ms")
    return cost


def _collect_results(plan: _ComparePlan, wall: Dict[str, float]
                     ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, List[Tuple[float, float]]]]]:
    """The results rows (variant -> table row, every measured number read back from the variant's
    TensorBoard run) and the loss curves (variant -> ``{"train"|"val": [(training tokens, loss)...]}``)."""
    from llp_pretrain.models import ModelConfig
    from llp_pretrain.models.flops import forward_flops_breakdown

    seq_len = plan.seq_len
    rows: Dict[str, Dict[str, Any]] = {}
    curves: Dict[str, Dict[str, List[Tuple[float, float]]]] = {}
    for v in plan.spec.variants:
        cfg = plan.run_cfgs[v]
        matched = plan.matched[v]
        tok_per_step = cfg.train.global_batch_size * seq_len
        sc = read_scalars(plan.run_dir / "runs" / v / "tensorboard")
        mcfg = ModelConfig(**matched["model"])
        attn = forward_flops_breakdown(mcfg, seq_len)["attention"] * 3 / seq_len
        steps_done = cfg.train.max_steps
        rows[v] = {
            "variant": v,
            "d_model": mcfg.d_model,
            "params": matched["params"],
            "params_rel_diff": matched["rel_diff"],
            "attention_flops_per_token": attn,
            "train_tokens": steps_done * tok_per_step,
            "step_time_s": steady_median(sc.get("train/step_time", [])),
            "tokens_per_sec": steady_median(sc.get("train/tokens_per_sec", [])),
            "peak_memory_gb": max((x for _, x in sc.get("train/memory_gb", [])), default=None),
            "final_train_loss": _last(sc.get("train/loss", [])),
            "val_loss": _last(sc.get("eval/loss", [])),
            "val_ppl": _last(sc.get("eval/ppl", [])),
            "val_bits_per_byte": _last(sc.get("eval/bits_per_byte", [])),
            "val_tokens_scored": int(_last(sc.get("eval/tokens", [])) or 0),
            "wall_time_s": wall[v],
        }
        curves[v] = {"train": [(s * tok_per_step, x) for s, x in sc.get("train/loss", [])],
                     "val": [(s * tok_per_step, x) for s, x in sc.get("val/loss", [])]}
    return rows, curves


def _write_plots(run_dir: Path, curves: Dict[str, Dict[str, List[Tuple[float, float]]]],
                 cost: Dict[str, List[Tuple[int, float]]]) -> None:
    """``loss_curves.png`` and ``cost_vs_seq_len.png`` under ``run_dir``."""
    plot_loss_curves(curves, run_dir / "loss_curves.png")
    plot_cost(cost, run_dir / "cost_vs_seq_len.png")


def _write_results(run_dir: Path, results: Dict[str, Any], say: Callable[..., None]) -> None:
    """``results.json`` (atomic) and ``results.md`` under ``run_dir``; the Markdown and the TensorBoard
    command are printed."""
    write_json_atomic(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(render_markdown(results))
    say((run_dir / "results.md").read_text())
    say(f"[compare] TensorBoard: {results['tensorboard']}")


def run_compare(config: str, out: Optional[str] = None, variants: Optional[Sequence[str]] = None,
                steps: Optional[int] = None, quiet: bool = False) -> Dict[str, Any]:
    """Run the whole comparison (see the module docstring); returns the ``results.json`` dict.

    Raises:
        ValueError / ConfigError: bad compare config or a variant's run config (before training).
        RuntimeError: a variant's training process failed (its log file is named).
    """
    from llp_pretrain.config import output_dir_problem

    t_start = time.time()
    spec, overrides, base, prep = load_compare_config(config, variants, steps)
    run_dir = Path(out or base.get("run", {}).get("output_dir") or "runs/compare")
    if output_dir_problem(run_dir):
        raise ValueError(f"{'--out' if out else 'run.output_dir'}: {output_dir_problem(run_dir)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    data_dir = _prepare_base(spec, base, prep, run_dir, say)
    plan = _plan_variants(spec, overrides, base, run_dir, data_dir, say)
    wall = _train_variants(plan, say)
    scored_len, stride = _evaluate_variants(plan, say)
    cost = _measure_cost(plan, say)
    rows, curves = _collect_results(plan, wall)
    _write_plots(run_dir, curves, cost)
    verdict = _verdict(rows, cost)
    results = {
        "config": str(config),
        "seq_len": plan.seq_len,
        "data": str(data_dir),
        "eval": {"split": "val", "scored_positions_per_window": scored_len, "stride": stride},
        "variants": rows,
        "cost_vs_seq_len": cost,
        "verdict": verdict,
        "total_wall_time_s": time.time() - t_start,
        "tensorboard": f"tensorboard --logdir {run_dir / 'runs'}",
    }
    _write_results(run_dir, results, say)
    return results


def render_markdown(results: Dict[str, Any]) -> str:
    """The ``results.md`` table (one row per variant) and the verdict lines."""
    head = ("| variant | d_model | params | attn MFLOPs/token | train tokens | s/step | tokens/s | peak mem GB | "
            "val loss | val ppl | bits/byte |")
    lines = [f"# Variant comparison (seq_len {results['seq_len']})", "",
             f"Validation: strided evaluation of the `val` split, last "
             f"{results['eval']['scored_positions_per_window']} positions of each window scored, stride "
             f"{results['eval']['stride']}; every number below is read back from the TensorBoard runs. s/step and "
             "tokens/s are medians over the log intervals after the first (warm-up) one; n/a: the run logged no "
             "later interval.", "",
             head, "|" + "---|" * 11]
    for r in results["variants"].values():
        lines.append(
            f"| {r['variant']} | {r['d_model']} | {r['params']:,} | {r['attention_flops_per_token'] / 1e6:.4g} | "
            f"{r['train_tokens']:,} | {_fmt(r['step_time_s'], '.3f')} | {_fmt(r['tokens_per_sec'], ',.0f')} | "
            f"{_fmt(r['peak_memory_gb'], '.2f')} | {_fmt(r['val_loss'], '.4f')} | {_fmt(r['val_ppl'], '.3f')} | "
            f"{_fmt(r['val_bits_per_byte'], '.4f')} |")
    vals = [r["val_loss"] for r in results["variants"].values() if r["val_loss"] is not None]
    if len(vals) > 1:
        lines += ["", f"Spread of the validation losses: {max(vals) - min(vals):.4f} nats (max - min); with one "
                  "seed, differences of this order may be noise."]
    lines += ["", "## Step time against seq_len (forward+backward of one window, median seconds)", ""]
    lens = sorted({n for pts in results["cost_vs_seq_len"].values() for n, _ in pts})
    lines.append("| variant | " + " | ".join(str(n) for n in lens) + " |")
    lines.append("|" + "---|" * (len(lens) + 1))
    for v, pts in results["cost_vs_seq_len"].items():
        d = dict(pts)
        lines.append(f"| {v} | " + " | ".join(_fmt(d.get(n), ".4f") for n in lens) + " |")
    lines += ["", "## Verdict", ""] + [f"- {x}" for x in results["verdict"]] + [""]
    return "\n".join(lines)
