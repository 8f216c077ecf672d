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


def install_pause_from_env() -> None:
    """Register :class:`PauseAfterStep` when ``LLP_PRETRAIN_PAUSE_AFTER_STEP`` is set."""
    from llp_pretrain.training import callbacks

    if os.environ.get(PAUSE_ENV):
        callbacks.register(PauseAfterStep(int(os.environ[PAUSE_ENV])))


def train_many(spec_path: str) -> int:
    """Run the trainings listed in a JSON spec one after another in this process (under torchrun or
    alone): ``[{"config": raw_config_dict, "resume": null|"auto"|path, "result": path_prefix}, ...]``.
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
                out = dataclasses.asdict(train(cfg, resume=job.get("resume"), overwrite=job.get("overwrite", False)))
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
