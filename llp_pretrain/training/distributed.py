"""Process group set-up and tear-down for training, and the one small collective helper.

:func:`setup_distributed` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
(torchrun, ``deepspeed``, srun wrappers); with none set it forms a 1-process group on 127.0.0.1 and a
free port. gloo on CPU, NCCL on GPU. Where a rank sits in the data-parallel x sequence-parallel grid
comes from the run's one :class:`~llp_pretrain.layout.ParallelLayout` (:attr:`DistInfo.layout`).
"""
from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from llp_pretrain.layout import ParallelLayout, RankCoords

__all__ = ["DistInfo", "DistributedInitError", "DIST_INIT_TIMEOUT_S", "setup_distributed", "free_port",
           "all_reduce", "destroy_process_group", "peer_failure_line"]

#: seconds the process-group initialisation may take before the process gives up with a message
#: (environment variable ``LLP_DIST_INIT_TIMEOUT_S`` overrides)
DIST_INIT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    """This process: global ``rank``, ``local_rank``, the run's :class:`ParallelLayout` and the torch
    ``device``; ``world_size``, ``dp_rank``/``dp_size`` and ``sp_rank``/``sp_size`` (sequence
    parallel) are read from the layout."""

    rank: int
    local_rank: int
    layout: ParallelLayout
    device: torch.device

    @property
    def coords(self) -> RankCoords:
        return self.layout.coords(self.rank)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    @property
    def sp_size(self) -> int:
        return self.layout.sp_size

    @property
    def dp_rank(self) -> int:
        return self.coords.dp_rank

    @property
    def sp_rank(self) -> int:
        return self.coords.sp_rank

    @property
    def reduce_device(self) -> Optional[torch.device]:
        """Where small collectives' tensors live: the GPU under NCCL, the CPU (None) under gloo."""
        return self.device if self.device.type == "cuda" else None


class DistributedInitError(RuntimeError):
    """The default process group could not be formed; the message (one line) says what was awaited."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(backend: str, rank: int, world: int, timeout_s: float) -> None:
    """``torch.distributed`` + DeepSpeed comm initialisation that cannot hang and never reuses
    another attempt's rendezvous keys.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the workers share the agent's TCPStore,
    which outlives a worker restart (``--max-restarts``): a restarted worker could read the dead
    attempt's gloo addresses from it (``connectFullMesh ... Connection refused``, or a hang). So the
    keys are put under ``llp/attempt<TORCHELASTIC_RESTART_COUNT>``. A watchdog ends the process
    (status 1, one line naming ``MASTER_ADDR:MASTER_PORT`` and the world size) if the rendezvous
    has not finished after ``timeout_s`` seconds; failures raise :class:`DistributedInitError`
    with the same information. DeepSpeed's comm layer then wraps the group."""
    from datetime import timedelta
    import threading

    import deepspeed
    import torch.distributed as dist
    from deepspeed.constants import default_pg_timeout as collective_timeout  # DEEPSPEED_TIMEOUT minutes

    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    what = (f"rank {rank}: {backend} process-group initialisation waited for {world} process(es) at "
            f"MASTER_ADDR:MASTER_PORT={addr}:{port}")
    advice = (f"check that all {world} ranks were started and can reach {addr}:{port} (same MASTER_ADDR/MASTER_PORT "
              f"and world size everywhere, no firewall), or raise LLP_DIST_INIT_TIMEOUT_S")

    def give_up() -> None:
        print(f"[llp-pretrain] error: {what} for {timeout_s:.0f} s and gave up; {advice}", file=sys.stderr, flush=True)
        os._exit(1)

    # the watchdog covers the rendezvous only: DeepSpeed's set-up below may JIT-build an op under a
    # file lock, which must not be killed half-way
    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(addr, int(port), world, False, timedelta(seconds=timeout_s))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"llp/attempt{attempt}", store), rank=rank,
                                    world_size=world, timeout=collective_timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=collective_timeout)
    except Exception as e:  # a refused connection, a store timeout, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DistributedInitError(f"{what} and failed ({type(e).__name__}: {msg}); {advice}") from None
    finally:
        watchdog.cancel()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # wraps the group formed above


def _init_timeout_s() -> float:
    raw = os.environ.get("LLP_DIST_INIT_TIMEOUT_S", str(DIST_INIT_TIMEOUT_S))
    try:
        timeout_s = float(raw)
    except ValueError:
        timeout_s = -1.0
    if not timeout_s > 0:
        raise ValueError(f"LLP_DIST_INIT_TIMEOUT_S={raw!r} is not a positive number of seconds")
    return timeout_s


def setup_distributed(sequence_parallel_size: int = 1) -> DistInfo:
    """Initialise the default process group (idempotent) and return the layout.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; when ``RANK`` is
    unset, sets up a single process (127.0.0.1, a free port). Backend: NCCL with CUDA, else gloo.
    Initialisation is bounded by ``LLP_DIST_INIT_TIMEOUT_S`` (default :data:`DIST_INIT_TIMEOUT_S`)
    and safe across torchrun worker restarts (:func:`_init_process_group`).
    Raises :class:`~llp_pretrain.layout.LayoutError` (a ``ValueError``) if the world size is not a
    multiple of ``sequence_parallel_size``, ``ValueError`` if
    ``LLP_DIST_INIT_TIMEOUT_S`` is not a positive number, :class:`DistributedInitError` if the group
    cannot be formed."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ["LOCAL_RANK"])
    layout = ParallelLayout(world, sequence_parallel_size)
    timeout_s = _init_timeout_s()
    cuda = torch.cuda.is_available()
    if cuda:
        # with one visible GPU per task (SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES) LOCAL_RANK can
        # exceed the visible device count; the task's own GPU is then index LOCAL_RANK % count
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        _init_process_group("nccl" if cuda else "gloo", rank, world, timeout_s)
    return DistInfo(rank, local_rank, layout, device)


def all_reduce(values: Sequence[float], op: str = "sum", device: Optional[torch.device] = None) -> List[float]:
    """All-reduce a few floats (float64) over the default group; ``op`` is ``"sum"`` or ``"max"``.
    A collective: every rank must call it with the same number of values."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def destroy_process_group() -> None:
    """Tear down the default process group if this process formed one (last step of every exit path)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: what a collective reports when another process of the job has gone (gloo, NCCL, the TCP store)
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted", "Connection refused")


def peer_failure_line(e: BaseException) -> Optional[str]:
    """One line for a collective that failed because another process of the job died (it ended with
    its own error line, or was killed): which rank this is, what the backend saw, and where to look.
    None when ``e`` is not such a failure."""
    import torch.distributed as dist

    text = str(e).strip()
    lost = isinstance(e, (dist.DistBackendError, dist.DistNetworkError)) or any(p in text for p in _PEER_LOST)
    if not isinstance(e, RuntimeError) or not lost:
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)          # gloo's [source file:line] prefix
    first = first.split(". This is typically")[0].strip()  # and its advice
    rank = os.environ.get("RANK", "0")
    return (f"rank {rank}: another process of this job failed, so a collective lost its connection ({first[:160]}); "
            "the failing rank's own error line names the cause")
