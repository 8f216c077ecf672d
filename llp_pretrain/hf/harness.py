"""``llp-pretrain harness``: lm-evaluation-harness on a checkpoint, through lm_eval's Python API.

``run_harness(CHECKPOINT, tasks)`` exports the checkpoint with ``--format hf`` into
``RUN/hf/<tag>`` (reused while its ``config.json`` records the same weights source and the same
generated code), runs ``lm_eval.simple_evaluate(model="hf", model_args={"pretrained": that dir,
"trust_remote_code": True, "prefix_token_id": EOS, ...})`` and writes the results JSON (atomically) to
``RUN/harness/results-<tag>-<time>.json``. With ``tensorboard=True`` each numeric score is logged as
``harness/<task>/<metric>`` at the checkpoint's step in ``RUN/tensorboard``. The local tasks of
``tasks.py`` (``kjv_next_verse``, ``kjv_ppl``) are written on demand; other tasks come from lm_eval's
registry (they need the dataset hub) or from ``include_path``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["ensure_export", "model_args", "run_harness", "scalar_scores", "add_parser", "main"]


def _is_export(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "modeling_llp_pretrain.py").is_file()


def _run_dir(checkpoint) -> Path:
    """The run directory of a checkpoint path (an export directory is its own)."""
    from llp_pretrain.export import resolve_checkpoint

    p = Path(checkpoint)
    return p if _is_export(p) else resolve_checkpoint(p).parent.parent


def ensure_export(checkpoint) -> tuple:
    """``(hf_dir, run_dir, step)`` for ``checkpoint``: an exported directory itself, or the export of a
    checkpoint into ``RUN/hf/<tag>`` (made when missing or stale)."""
    from llp_pretrain import checkpoint as ckpt
    from llp_pretrain.export import resolve_checkpoint
    from llp_pretrain.hf.bundle import sources_sha256
    from llp_pretrain.hf.export import export_hf

    p = Path(checkpoint)
    if _is_export(p):
        step = json.loads((p / "config.json").read_text()).get("llp_step")
        return p, p, step
    tag_dir = resolve_checkpoint(p)
    run_dir = tag_dir.parent.parent
    out = run_dir / "hf" / tag_dir.name
    cfg = out / "config.json"
    fresh = cfg.is_file() and json.loads(cfg.read_text()).get("llp_models_sha256") == sources_sha256()
    if not fresh:
        export_hf(tag_dir, out)
    return out, run_dir, int(ckpt.read_meta(tag_dir)["step"])


def model_args(hf_dir, dtype: str = "float32", device: str = "cpu") -> Dict:
    """lm_eval ``hf`` model arguments for an export. ``prefix_token_id`` is the EOS id: our shards put
    EOS after every document (``docs/internals.md``) and never a BOS, so a document (and a rolling
    perplexity window with no context) starts after EOS, as in training."""
    args = {"pretrained": str(hf_dir), "trust_remote_code": True, "dtype": dtype, "device": device}
    eos = json.loads((Path(hf_dir) / "config.json").read_text()).get("eos_token_id")
    if eos is not None:
        args["prefix_token_id"] = int(eos)
    return args


def scalar_scores(results: Dict) -> Dict[str, float]:
    """``{"<task>/<metric>": value}`` of lm_eval's ``results["results"]`` (filter ``none`` dropped from
    the name, other filters appended; standard errors and non-numbers left out)."""
    out = {}
    for task, scores in results.get("results", {}).items():
        for key, val in scores.items():
            if not isinstance(val, (int, float)) or isinstance(val, bool) or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            out[f"{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(val)
    return out


def run_harness(checkpoint, tasks: Sequence[str], limit: Optional[float] = None, batch_size: int = 1,
                tensorboard: bool = False, include_path: Optional[str] = None, device: str = "cpu",
                dtype: str = "float32", num_fewshot: Optional[int] = None) -> Dict:
    """Run lm-evaluation-harness ``tasks`` on ``checkpoint``; returns ``{"results": lm_eval's dict,
    "path": results JSON, "scores": scalar_scores}``. Raises ``ValueError`` for an empty task list."""
    from llp_pretrain.hf import require_eval_extra

    require_eval_extra("harness")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llp_pretrain.checkpoint import write_json_atomic
    from llp_pretrain.hf.tasks import LOCAL_TASKS, write_kjv_tasks

    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError("--tasks is empty; name lm-eval tasks, e.g. kjv_next_verse,kjv_ppl or hellaswag")
    run_dir = _run_dir(checkpoint)
    paths: List[str] = [include_path] if include_path else []
    if any(t in LOCAL_TASKS for t in tasks):
        paths.append(str(write_kjv_tasks(run_dir / "harness" / "tasks")))
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if not t.endswith((".yaml", ".yml")) and not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm_eval ls tasks`; local tasks: "
                         f"{', '.join(LOCAL_TASKS)}; your own YAMLs: --include-path DIR")
    hf_dir, run_dir, step = ensure_export(checkpoint)
    res = lm_eval.simple_evaluate(
        model="hf", model_args=model_args(hf_dir, dtype, device),
        tasks=tasks, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, task_manager=manager,
        log_samples=False)
    out_dir = run_dir / "harness"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results-{hf_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(path, json.loads(json.dumps(res, default=str)))
    scores = scalar_scores(res)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        for name, val in scores.items():
            w.add_scalar(f"harness/{name}", val, int(step or 0))
        w.close()
    return {"results": res, "path": path, "scores": scores}


def add_parser(add) -> None:
    """The ``harness`` sub-command of ``llp-pretrain``; ``add(name, help)`` makes the sub-parser."""
    p = add("harness", "lm-evaluation-harness on a checkpoint (exports it with --format hf)")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir or an --format hf export")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. kjv_next_verse,kjv_ppl")
    p.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (none: the task's own)")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the exported model is loaded in")
    p.add_argument("--tensorboard", action="store_true", help="log harness/<task>/<metric> at the checkpoint's step")


def main(args) -> int:
    """Handler of ``llp-pretrain harness``: prints one line per score and the results path."""
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    out = run_harness(args.checkpoint, [t.strip() for t in args.tasks.split(",")], limit=limit,
                      batch_size=args.batch_size, tensorboard=args.tensorboard, include_path=args.include_path,
                      device=args.device, dtype=args.dtype, num_fewshot=args.num_fewshot)
    for name, val in sorted(out["scores"].items()):
        print(f"{name}: {val:.6g}")
    print(f"wrote {out['path']}")
    return 0
