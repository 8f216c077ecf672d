"""``python -m llp_pretrain.torchrun ARGS``: ``torchrun ARGS`` (``torch.distributed.run``) that ends a
failed job with one line instead of torchrun's ``ChildFailedError`` traceback and summary box.

The launchers (``launch/train.sh``, ``launch/multinode.sh``, ``launch/slurm/task.sh``) use it. Every
worker has already printed its own one-line error; this line names the first rank that failed and
its exit code (or signal), and the exit status is that code (1 for a signal)."""
from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"exit code {code}" if code >= 0 else f"signal {failure.signal_name()}"
        print(f"torchrun: error: {e.name}: rank {rank} failed first ({how}) of {len(e.failures)} failed "
              "process(es); the ranks' own error lines above name the cause", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
