"""Test harness entry points (not installed): several trainings in one process, and the CLI with the
test-only pause callback.

    python tests/train_many.py train-many SPEC.json     # alone or under torchrun (a script path)
    python tests/train_many.py train --config ...        # `llp-pretrain train` + pause callback

``LLP_PRETRAIN_PAUSE_AFTER_STEP=N`` installs :class:`PauseAfterStep`: after optimizer step ``N`` the
process stops making progress until any rank is signalled (SIGTERM/SIGUSR1), so a test can kill or
signal it at a known point. The launcher tests reach the second form through ``LLP_TRAIN_CMD``
(``launch_fixtures.launch_env``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repository's packages come first
    sys.path.insert(0, str(REPO))

PAUSE_ENV = "LLP_PRETRAIN_PAUSE_AFTER_STEP"


class PauseAfterStep:
    """Callback: after optimizer step ``step``, wait (polling every 50 ms, a collective) until any rank
    has been signalled; the trainer's stop decision then ends the run at this step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.step != self.step:
            return
        from llp_pretrain.training.distributed import all_reduce

        while not all_reduce([float(trainer.stop.signals.flag)], op="max", device=trainer.d.reduce_device)[0]:
            time.sleep(0.05)
        trainer.stop.request("signal")  # every rank leaves the loop above at the same poll


class StopAndDump:
    """Callback for layout-change tests: ``dump_start`` (a path): right after the checkpoint is loaded,
    write every parameter's full fp32 master value and Adam ``exp_avg``/``exp_avg_sq`` (DeepSpeed's
    public ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``; the plain optimizer's
    state under ZeRO-0) to a safetensors file (rank 0; collective). ``dump_step`` + ``dump_path``:
    the same after that optimizer step; ``stop_after``: request a checkpoint-and-stop after that step."""

    def __init__(self, job):
        self.job = job

    def on_train_start(self, trainer) -> None:
        if self.job.get("dump_start"):
            dump_full_states(trainer, self.job["dump_start"])

    def on_step_end(self, trainer) -> None:
        if self.job.get("dump_path") and trainer.step == self.job.get("dump_step"):
            dump_full_states(trainer, self.job["dump_path"])
        if trainer.step == self.job.get("stop_after"):
            trainer.stop.request("signal")


def dump_full_states(trainer, path: str) -> None:
    """Write ``{name}/fp32``, ``{name}/exp_avg``, ``{name}/exp_avg_sq`` of every parameter (full,
    unpartitioned, fp32) and ``global_steps`` to ``path`` (safetensors; rank 0 writes)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    engine, out = trainer.engine, {}
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        # ZeRO 1/2 steps its parameter groups one at a time and links the Adam-state views of every
        # group after the first group's first step, when the other groups have no state yet, so
        # safe_get_full_optimizer_state finds no exp_avg for biases/norms (group 2). Link them again.
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for i, flat in enumerate(opt.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], flat, opt.optimizer.state)
    base = getattr(opt, "optimizer", opt)  # the torch AdamW inside DeepSpeed's wrapper (if any)
    for name, p in engine.module.named_parameters():
        fp32 = safe_get_full_fp32_param(p)
        if fp32 is None:  # ZeRO-0: whole, unpartitioned states; read below from the optimizer itself
            continue
        avg, sq = safe_get_full_optimizer_state(p, "exp_avg"), safe_get_full_optimizer_state(p, "exp_avg_sq")
        for key, t in (("fp32", fp32), ("exp_avg", avg), ("exp_avg_sq", sq)):
            out[f"{name}/{key}"] = t.detach().float().cpu().clone().contiguous()
    if not out:  # ZeRO-0: AdamW's parameters are the model's (fp32) or DeepSpeed's flat fp32 masters (bf16)
        for i, group in enumerate(base.param_groups):
            for j, q in enumerate(group["params"]):
                st = base.state[q]
                for key, t in (("fp32", q), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"])):
                    out[f"group{i}.{j}/{key}"] = t.detach().float().cpu().clone().contiguous()
    adam_steps = sorted({float(st["step"]) for st in base.state.values() if "step" in st})
    out["global_steps"] = torch.tensor([engine.global_steps, trainer.step])
    out["adam_steps"] = torch.tensor(adam_steps, dtype=torch.float64)
    if trainer.d.rank == 0:
        save_file(out, path)


def install_pause_from_env() -> None:
    """Register :class:`PauseAfterStep` when ``LLP_PRETRAIN_PAUSE_AFTER_STEP`` is set."""
    from llp_pretrain.training import callbacks

    if os.environ.get(PAUSE_ENV):
        callbacks.register(PauseAfterStep(int(os.environ[PAUSE_ENV])))


def train_many(spec_path: str) -> int:
    """Run the trainings listed in a JSON spec one after another in this process (under torchrun or
    alone): ``[{"config": raw_config_dict, "resume": null|"auto"|path, "result": path_prefix}, ...]``
    (plus the :class:`StopAndDump` keys).
    Each rank writes ``<result>.rank<R>.json`` with the ``TrainResult`` fields, or ``{"error", "type"}``
    for a job with ``"expect_error": true`` that raised."""
    import dataclasses

    from llp_pretrain.config import load_config
    from llp_pretrain.training import train
    from llp_pretrain.training.distributed import destroy_process_group

    jobs = json.loads(Path(spec_path).read_text())
    try:
        for job in jobs:
            t0 = time.time()
            cfg = load_config(raw=job["config"], overrides=job.get("overrides", []))
            try:
                out = dataclasses.asdict(train(cfg, resume=job.get("resume"), overwrite=job.get("overwrite", False),
                                               callbacks=[StopAndDump(job)]))
            except Exception as e:  # recorded for jobs that are expected to fail
                if not job.get("expect_error"):
                    raise
                out = {"error": str(e), "type": type(e).__name__}
            print(f"[train-many] {cfg.run.output_dir}: {time.time() - t0:.1f}s", flush=True)
            rank = int(os.environ.get("RANK", "0"))
            if job.get("result"):
                Path(f"{job['result']}.rank{rank}.json").write_text(json.dumps(out))
    finally:
        destroy_process_group()
    return 0


def main(argv) -> int:
    install_pause_from_env()
    if len(argv) == 2 and argv[0] == "train-many":
        return train_many(argv[1])
    if argv and argv[0] == "train":
        from llp_pretrain.cli import main as cli_main

        return cli_main(argv)
    print("usage: python tests/train_many.py train-many SPEC.json | train --config ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
