"""Helpers shared by the launchers in ``launch/`` (``train.sh``, ``multinode.sh``, the SLURM batch script).

Everything here runs *before* training starts, on the launching host, so it imports neither torch
nor DeepSpeed (the launchers call it on every node and every requeue; it must be fast and must not
touch an accelerator).

Command line (used by the shell launchers, handy for users too)::

    python -m llp_pretrain.launch_utils expand-nodelist 'gpu[01-03,07]'   # one host per line
    python -m llp_pretrain.launch_utils first-host "$SLURM_JOB_NODELIST"   # scontrol, else Python
    python -m llp_pretrain.launch_utils master-port "$SLURM_JOB_ID"        # port from the job id
    python -m llp_pretrain.launch_utils config-path configs/quickstart.yaml  # absolute path
    python -m llp_pretrain.launch_utils hostfile launch/hostfile.example   # "host slots" per line
    python -m llp_pretrain.launch_utils fit-workers --config C.yaml --cpus-per-process 8 [-- --set ...]
    python -m llp_pretrain.launch_utils layout --config C.yaml --nnodes 2 --nproc-per-node 8 \\
        [--hosts a,b] [--master-addr A --master-port P] [--backend nccl] [--set k=v ...]

``layout`` prints the resolved world layout, then validates the whole run config for that world
size with the training CLI's loader, and exits with status 2 (message on stderr) when the layout
cannot work with the config: world size not divisible by ``parallel.sequence_parallel_size``,
fewer processes than the sequence-parallel size, or a ``train.global_batch_size`` that the
data-parallel size cannot reach with ``train.micro_batch_size`` (and ``train.grad_accum_steps``),
or any other problem :func:`llp_pretrain.config.load_config` reports.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from llp_pretrain.layout import ParallelLayout

__all__ = [
    "LaunchError",
    "LayoutError",
    "WorldLayout",
    "expand_nodelist",
    "first_host",
    "master_port_from_job_id",
    "parse_hostfile",
    "read_layout_settings",
    "resolve_config_path",
    "resolve_layout",
    "format_layout",
    "fit_data_workers",
    "validate_run_config",
    "main",
]

#: Ports handed out by :func:`master_port_from_job_id` lie in ``[PORT_BASE, PORT_BASE + PORT_SPAN)``:
#: below Linux's default ephemeral range (32768-60999), so an outgoing connection never holds one.
PORT_BASE = 15000
PORT_SPAN = 15000


class LaunchError(ValueError):
    """A launcher input (nodelist, hostfile, job id, config) is malformed; the message says which."""


class LayoutError(LaunchError):
    """The requested world layout cannot run the given config; the message says what to change."""


# --------------------------------------------------------------------------------------------
# SLURM nodelists
# --------------------------------------------------------------------------------------------
def _split_top_level(text: str, sep: str = ",") -> List[str]:
    """Split ``text`` on ``sep`` outside square brackets (``a[1,2],b`` -> ``["a[1,2]", "b"]``)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"nodelist {text!r}: ']' without a matching '['")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise LaunchError(f"nodelist {text!r}: '[' without a matching ']'")
    parts.append("".join(cur))
    return parts


def _expand_range_list(body: str, nodelist: str) -> List[str]:
    """Expand the inside of one bracket, ``01-03,07`` -> ``["01", "02", "03", "07"]``.

    Zero padding follows SLURM: the width of the lower bound is kept (``[001-002]`` -> ``001, 002``).
    """
    out: List[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise LaunchError(
                f"nodelist {nodelist!r}: bad range {item!r} inside [...]; expected N or N-M with "
                "decimal numbers, e.g. gpu[01-03,07]"
            )
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise LaunchError(f"nodelist {nodelist!r}: range {item!r} runs backwards")
        width = len(lo_s) if lo_s.startswith("0") or len(lo_s) == len(hi_s) else 0
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM hostlist expression into host names, in SLURM's order, without ``scontrol``.

    Understands comma-separated entries, bracketed ranges and lists with zero padding, and several
    bracket groups in one name (the cartesian product, leftmost varying slowest, as SLURM does)::

        gpu[01-03,07]     -> gpu01 gpu02 gpu03 gpu07
        a1,b[2-3]         -> a1 b2 b3
        node-[001-002]    -> node-001 node-002
        r[1-2]n[1-2]      -> r1n1 r1n2 r2n1 r2n2

    Duplicates are kept (SLURM keeps them too). Raises :class:`LaunchError` for an empty list,
    unbalanced brackets or a malformed range; never guesses a host.
    """
    text = (nodelist or "").strip()
    if not text:
        raise LaunchError("empty nodelist: SLURM_JOB_NODELIST is unset or empty (are you inside a job?)")
    hosts: List[str] = []
    for entry in _split_top_level(text):
        entry = entry.strip()
        if not entry:
            raise LaunchError(f"nodelist {nodelist!r}: empty entry between commas")
        # re.split with a capture group alternates: literal, bracket body, literal, ...
        pieces = re.split(r"\[([^\[\]]*)\]", entry)
        expansions = [""]
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if "[" in piece or "]" in piece:
                    raise LaunchError(f"nodelist {nodelist!r}: nested or unbalanced brackets in {entry!r}")
                expansions = [e + piece for e in expansions]
            else:
                if not piece.strip():
                    raise LaunchError(f"nodelist {nodelist!r}: empty brackets in {entry!r}")
                values = _expand_range_list(piece, nodelist)
                expansions = [e + v for e in expansions for v in values]
        hosts.extend(expansions)
    return hosts


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """Return the first host of a SLURM nodelist: the rendezvous (rank 0) host of a job.

    Uses ``scontrol show hostnames`` when it is on PATH (SLURM's own expander), else
    :func:`expand_nodelist`. Raises :class:`LaunchError` if the list is empty or cannot be expanded;
    there is no fallback to ``localhost``.
    """
    if not (nodelist or "").strip():
        raise LaunchError("empty nodelist: SLURM_JOB_NODELIST is unset or empty (are you inside a job?)")
    if use_scontrol and shutil.which("scontrol"):
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
        )
        hosts = proc.stdout.split()
        if proc.returncode == 0 and hosts:
            return hosts[0]
        print(
            f"warning: 'scontrol show hostnames {nodelist}' failed ({proc.stderr.strip()!r}); "
            "expanding the nodelist in Python",
            file=sys.stderr,
        )
    return expand_nodelist(nodelist)[0]


def master_port_from_job_id(job_id: "int | str", base: int = PORT_BASE, span: int = PORT_SPAN) -> int:
    """Rendezvous port for a SLURM job: ``base + job_id % span`` (default 15000-29999).

    Two jobs sharing a node get different ports unless their ids differ by a multiple of ``span``,
    and the port never falls in Linux's ephemeral range. Array jobs pass ``SLURM_JOB_ID`` (unique
    per array task). Raises :class:`LaunchError` for a non-numeric id or a range outside 1024-65535.
    """
    text = str(job_id).strip()
    if not (text.isascii() and text.isdigit()):
        raise LaunchError(f"SLURM job id {job_id!r} is not a number (use SLURM_JOB_ID, not SLURM_ARRAY_JOB_ID_TASK)")
    jid = int(text)
    if base < 1024 or base + span > 65536 or span < 1:
        raise LaunchError(f"port range [{base}, {base + span}) is outside 1024-65535")
    return base + jid % span


# --------------------------------------------------------------------------------------------
# Hostfiles (DeepSpeed format: "host slots=N")
# --------------------------------------------------------------------------------------------
def parse_hostfile(path: "str | os.PathLike") -> List[Tuple[str, int]]:
    """Read a DeepSpeed-style hostfile into ``[(host, slots), ...]`` in file order.

    Format: one ``hostname slots=N`` per line; ``#`` starts a comment; blank lines are ignored.
    Raises :class:`LaunchError` naming the file and line for a bad line, a repeated host, zero
    slots, or a file without hosts.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LaunchError(f"cannot read hostfile {p}: {exc.strerror}") from None
    hosts: List[Tuple[str, int]] = []
    seen: Dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m:
            raise LaunchError(
                f"{p}:{lineno}: expected 'HOSTNAME slots=N', got {raw.strip()!r}"
            )
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise LaunchError(f"{p}:{lineno}: host {host} has slots={slots}; need at least 1")
        if host in seen:
            raise LaunchError(f"{p}:{lineno}: host {host} is listed twice (first on line {seen[host]})")
        seen[host] = lineno
        hosts.append((host, slots))
    if not hosts:
        raise LaunchError(f"hostfile {p} lists no hosts; add lines like 'node01 slots=8'")
    return hosts


# --------------------------------------------------------------------------------------------
# World layout
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorldLayout:
    """The process layout of one run.

    ``world_size = nnodes * nproc_per_node = data_parallel_size * sequence_parallel_size``;
    global rank ``r`` runs on node ``r // nproc_per_node`` with local rank ``r % nproc_per_node``.
    """

    nnodes: int
    nproc_per_node: int
    sequence_parallel_size: int
    hosts: Tuple[str, ...] = ()
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    backend: Optional[str] = None
    global_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    grad_accum_steps: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def parallel(self) -> ParallelLayout:
        """The run's data-parallel x sequence-parallel layout (the one the engine builds)."""
        return ParallelLayout(self.world_size, self.sequence_parallel_size)

    @property
    def data_parallel_size(self) -> int:
        return self.parallel.dp_size

    def node_of(self, rank: int) -> int:
        """The node that global ``rank`` runs on."""
        return rank // self.nproc_per_node

    def node_ranks(self, node_rank: int) -> range:
        """Global ranks of node ``node_rank``."""
        return range(node_rank * self.nproc_per_node, (node_rank + 1) * self.nproc_per_node)


def extract_set_args(args: Sequence[str]) -> List[str]:
    """Pick the ``key=value`` of every ``--set key=value`` / ``--set=key=value`` in training args.

    Other arguments (``--resume auto`` ...) are ignored; several assignments may follow one
    ``--set`` (``--set a=1 b=2``) as the training CLI accepts.
    """
    out: List[str] = []
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if a.startswith("--set="):
            out.append(a[len("--set="):])
        elif a == "--set":
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                out.append(args[i])
                i += 1
            continue
        i += 1
    return out


def resolve_config_path(config: "str | os.PathLike") -> Path:
    """Absolute path of a run YAML, looked up like the training CLI does
    (:func:`llp_pretrain.config.find_config_file`: as given, then in the shipped ``configs/``).
    Raises :class:`LaunchError` listing the places tried."""
    from llp_pretrain.config import find_config_file

    try:
        return find_config_file(str(config))
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise LaunchError(str(exc)) from None


def read_layout_settings(config: "str | os.PathLike", overrides: Sequence[str] = ()) -> Dict[str, Optional[int]]:
    """Read the settings a launcher checks from a run YAML plus ``--set`` overrides, read as the
    training CLI reads them (:func:`llp_pretrain.config.read_run_config`).

    Returns ``{"sequence_parallel_size", "num_workers", "global_batch_size", "micro_batch_size",
    "grad_accum_steps"}`` (``sequence_parallel_size`` defaults to 1, the others to ``None`` when
    absent). Only these keys are read here; the training CLI validates the whole config.
    Raises :class:`LaunchError` naming the file if it is missing, not YAML (duplicate keys too), a
    ``--set`` item is malformed, or a value is not an integer.
    """
    from llp_pretrain.config import ConfigError, read_run_config

    p = resolve_config_path(config)
    try:
        cfg = read_run_config(p, list(overrides))  # the training CLI's own reading of the YAML and --set
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None

    def get(section: str, key: str):
        sec = cfg.get(section) or {}
        if not isinstance(sec, dict):
            raise LaunchError(f"config {p}: section '{section}' must be a mapping")
        v = sec.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise LaunchError(f"config {p}: {section}.{key} must be an integer, got {v!r}")
        return v

    sp = get("parallel", "sequence_parallel_size")
    return {
        "sequence_parallel_size": 1 if sp is None else sp,
        "num_workers": get("data", "num_workers"),
        "global_batch_size": get("train", "global_batch_size"),
        "micro_batch_size": get("train", "micro_batch_size"),
        "grad_accum_steps": get("train", "grad_accum_steps"),
    }


def resolve_layout(
    nnodes: int,
    nproc_per_node: int,
    sequence_parallel_size: int = 1,
    *,
    hosts: Sequence[str] = (),
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
    backend: Optional[str] = None,
    global_batch_size: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    grad_accum_steps: Optional[int] = None,
) -> WorldLayout:
    """Build and validate a :class:`WorldLayout`.

    Rules (the engine's, checked before any process starts):
    ``world_size >= sequence_parallel_size``; ``world_size % sequence_parallel_size == 0``;
    if ``global_batch_size`` and ``micro_batch_size`` are set,
    ``global_batch_size == micro_batch_size * grad_accum_steps * data_parallel_size`` for a whole
    ``grad_accum_steps >= 1`` (the given one, if set). Raises :class:`LayoutError` saying which
    numbers clash and what would work.
    """
    for name, v in (("nnodes", nnodes), ("nproc_per_node", nproc_per_node),
                    ("sequence_parallel_size", sequence_parallel_size)):
        if not isinstance(v, int) or v < 1:
            raise LayoutError(f"{name} must be a positive integer, got {v!r}")
    if hosts and len(hosts) != nnodes:
        raise LayoutError(f"{len(hosts)} hosts ({', '.join(hosts)}) but nnodes={nnodes}")
    sp = sequence_parallel_size
    why = ParallelLayout.problem(nnodes * nproc_per_node, sp, f" ({nnodes} node(s) x {nproc_per_node} process(es))")
    if why:
        raise LayoutError(why)
    if global_batch_size is not None and micro_batch_size is not None:
        try:
            ParallelLayout(nnodes * nproc_per_node, sp).batch(micro_batch_size, grad_accum_steps, global_batch_size)
        except ValueError as exc:
            raise LayoutError(str(exc)) from None
    return WorldLayout(
        nnodes=nnodes, nproc_per_node=nproc_per_node, sequence_parallel_size=sp, hosts=tuple(hosts),
        master_addr=master_addr, master_port=master_port, backend=backend,
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
    )


def fit_data_workers(requested: Optional[int], cpus_per_process: int, default: int = 1) -> int:
    """Dataloader workers per process that fit the CPUs a scheduler gave each process.

    Each process keeps one CPU for itself, so at most ``cpus_per_process - 1`` workers;
    ``requested`` (the config's ``data.num_workers``, ``default`` when unset) is lowered to that,
    never raised. Raises :class:`LaunchError` for ``cpus_per_process < 1``."""
    if cpus_per_process < 1:
        raise LaunchError(f"cpus per process must be at least 1, got {cpus_per_process}")
    want = default if requested is None else requested
    return max(0, min(want, cpus_per_process - 1))


def format_layout(layout: WorldLayout, launcher: str = "", node_rank: Optional[int] = None) -> str:
    """Human-readable world layout, one ``[llp-launch]`` line each (what every launcher prints)."""
    tag = "[llp-launch]"
    lines = [
        f"{tag} world layout{(' (' + launcher + ')') if launcher else ''}: nodes={layout.nnodes} "
        f"nproc_per_node={layout.nproc_per_node} world_size={layout.world_size} "
        f"data_parallel_size={layout.data_parallel_size} "
        f"sequence_parallel_size={layout.sequence_parallel_size}"
        + (f" backend={layout.backend}" if layout.backend else "")
    ]
    if layout.master_addr:
        lines.append(f"{tag} rendezvous: {layout.master_addr}:{layout.master_port} (rank 0 runs on node 0)")
    if layout.global_batch_size is not None and layout.micro_batch_size is not None:
        gas, _ = layout.parallel.batch(layout.micro_batch_size, layout.grad_accum_steps, layout.global_batch_size)
        lines.append(
            f"{tag} batch: global_batch_size={layout.global_batch_size} = micro_batch_size="
            f"{layout.micro_batch_size} x grad_accum_steps={gas} x data_parallel_size={layout.data_parallel_size}"
        )
    sp = layout.sequence_parallel_size
    if sp > 1:
        groups = layout.parallel.sp_groups()
        shown = " ".join(f"[{g[0]}-{g[-1]}]" for g in groups[:4]) + (" ..." if len(groups) > 4 else "")
        lines.append(f"{tag} sequence-parallel groups (consecutive ranks): {shown}")
        if any(len({layout.node_of(r) for r in g}) > 1 for g in groups):
            lines.append(f"{tag} warning: nproc_per_node={layout.nproc_per_node} is not a multiple of "
                         f"sequence_parallel_size={sp}: some groups span two nodes and their halo exchange "
                         "crosses the network")
    show = range(layout.nnodes) if node_rank is None else [node_rank]
    for n in show:
        r = layout.node_ranks(n)
        host = layout.hosts[n] if layout.hosts else (socket.gethostname() if node_rank is not None else "?")
        mark = " <- this node" if node_rank is not None else ""
        lines.append(f"{tag}   node {n} ({host}): ranks {r.start}-{r.stop - 1}{mark}")
    return "\n".join(lines)


def validate_run_config(config: "str | os.PathLike", overrides: Sequence[str], world_size: int):
    """Validate the whole run config for ``world_size`` processes with the training CLI's own loader
    (:func:`llp_pretrain.config.load_config`: every section, the shards' manifest, the DeepSpeed
    JSON), so a bad config fails on the launching host before any process starts.

    Returns the validated ``RunConfig``. Raises :class:`LaunchError` carrying every problem the
    loader found."""
    from llp_pretrain.config import ConfigError, load_config

    try:
        return load_config(str(config), list(overrides), world_size=world_size)
    except ConfigError as exc:
        raise LaunchError(f"{exc}\n(checked for world_size={world_size} before starting training)") from None
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise LaunchError(f"config {config}: {exc}") from None


def check_resume_world_size(cfg, train_args: Sequence[str], world_size: int) -> None:
    """Pre-flight for a resume: when ``train_args`` resume (``--resume auto|PATH``, no ``--overwrite``)
    a checkpoint written with another global batch size than this config has on ``world_size``
    processes (another layout is fine: the trainer converts), raise :class:`LaunchError` with the
    trainer's own message (what to do), before any process starts. A checkpoint this host cannot resolve is left to the trainer to report."""
    from llp_pretrain import checkpoint as ckpt
    from llp_pretrain.training.checkpointer import check_resume_world

    args = list(train_args)
    if "--overwrite" in args or "--resume" not in args or args.index("--resume") + 1 >= len(args):
        return
    resume = args[args.index("--resume") + 1]
    try:
        where = ckpt.resolve_resume(resume, Path(cfg.run.output_dir) / "checkpoints")
        meta = ckpt.read_meta(where[0] / where[1]) if where else None
    except (OSError, ValueError):
        return
    if meta is None:
        return
    try:
        check_resume_world(meta, world_size, cfg.parallel.sequence_parallel_size, str(where[0] / where[1]),
                           cfg.train.global_batch_size)
    except ValueError as exc:
        raise LaunchError(f"{exc}\n(checked for world_size={world_size} before starting training)") from None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llp_pretrain.launch_utils", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("expand-nodelist", help="expand a SLURM nodelist in Python, one host per line")
    p.add_argument("nodelist")
    p = sub.add_parser("first-host", help="first host of a SLURM nodelist (scontrol if present)")
    p.add_argument("nodelist")
    p.add_argument("--no-scontrol", action="store_true", help="use the Python expander only")
    p = sub.add_parser("master-port", help="rendezvous port derived from a SLURM job id")
    p.add_argument("job_id")
    p.add_argument("--base", type=int, default=PORT_BASE)
    p.add_argument("--span", type=int, default=PORT_SPAN)
    p = sub.add_parser("hostfile", help="validate a DeepSpeed hostfile; print 'host slots' lines")
    p.add_argument("path")
    p = sub.add_parser("config-path", help="absolute path of a run YAML (as the training CLI finds it)")
    p.add_argument("config")
    p = sub.add_parser("fit-workers", help="dataloader workers per process that fit the CPUs per process")
    p.add_argument("--config", required=True)
    p.add_argument("--cpus-per-process", type=int, required=True)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("layout", help="print and validate the world layout for a config")
    p.add_argument("--config", required=True)
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--node-rank", type=int, default=None)
    p.add_argument("--hosts", default="", help="comma-separated host of each node, in node-rank order")
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--launcher", default="")
    p.add_argument("--no-config-check", action="store_true",
                   help="skip the full run-config validation (llp_pretrain.config.load_config)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="the training arguments (after --); their --set overrides are applied")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m llp_pretrain.launch_utils``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        if args.cmd == "expand-nodelist":
            print("\n".join(expand_nodelist(args.nodelist)))
        elif args.cmd == "first-host":
            print(first_host(args.nodelist, use_scontrol=not args.no_scontrol))
        elif args.cmd == "master-port":
            print(master_port_from_job_id(args.job_id, args.base, args.span))
        elif args.cmd == "hostfile":
            for host, slots in parse_hostfile(args.path):
                print(f"{host} {slots}")
        elif args.cmd == "config-path":
            print(resolve_config_path(args.config))
        elif args.cmd == "fit-workers":
            train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
            settings = read_layout_settings(args.config, extract_set_args(train_args))
            n = fit_data_workers(settings["num_workers"], args.cpus_per_process)
            if settings["num_workers"] is not None and n < settings["num_workers"]:
                print(f"[llp-launch] data.num_workers {settings['num_workers']} -> {n}: "
                      f"{args.cpus_per_process} CPU(s) per process", file=sys.stderr)
            print(n)
        elif args.cmd == "layout":
            train_args = list(args.train_args)
            if train_args and train_args[0] == "--":
                train_args = train_args[1:]
            settings = read_layout_settings(args.config, extract_set_args(train_args))
            hosts = [h for h in args.hosts.split(",") if h] if args.hosts else []
            if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
                raise LayoutError(f"node rank {args.node_rank} is outside 0..{args.nnodes - 1}")
            layout = resolve_layout(
                args.nnodes, args.nproc_per_node, settings["sequence_parallel_size"], hosts=hosts,
                master_addr=args.master_addr, master_port=args.master_port, backend=args.backend,
                global_batch_size=settings["global_batch_size"],
                micro_batch_size=settings["micro_batch_size"],
                grad_accum_steps=settings["grad_accum_steps"],
            )
            print(format_layout(layout, args.launcher, args.node_rank), flush=True)
            if not args.no_config_check:
                cfg = validate_run_config(args.config, extract_set_args(train_args), layout.world_size)
                check_resume_world_size(cfg, train_args, layout.world_size)
    except LaunchError as exc:
        print(f"[llp-launch] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
