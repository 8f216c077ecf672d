"""DeepSpeed training engine: distributed setup, the training loop, evaluation, checkpoints, signals.

``train(cfg, resume)`` runs one training job described by a validated :class:`RunConfig`:

* distributed layout from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
  (torchrun, ``deepspeed``, srun wrappers); with none set, a 1-process group on 127.0.0.1 and a
  free port. gloo on CPU, NCCL on GPU (``deepspeed.init_distributed``).
* ``data_parallel_size = world_size / sequence_parallel_size``; ``dp_rank = rank // P`` so that the
  ``P`` consecutive ranks of a sequence-parallel group read the same samples.
* ``deepspeed.initialize`` with the resolved DeepSpeed JSON (ZeRO stage/offload from the JSON,
  batch sizes, clipping and precision from the YAML), ``torch.optim.AdamW`` (DeepSpeedCPUAdam
  when the JSON offloads the optimizer) and a ``LambdaLR`` with linear warmup then cosine decay to
  ``min_lr`` (:func:`lr_at`); DeepSpeed saves/restores both in checkpoints.
* loss: :func:`compute_loss` (the one place the sequence-parallel code plugs into).
* non-finite loss: the step is skipped (no parameter update) and counted; ``max_nonfinite_steps``
  in a row abort with an error.
* checkpoints every ``save_interval`` steps, at the end, at ``time_limit_minutes`` and on
  SIGTERM/SIGUSR1 (all ranks agree on the step, save, then exit with status 0).
"""
from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from llp_pretrain import checkpoint as ckpt
from llp_pretrain.config import RunConfig, dump_yaml, resolve_tokenizer, resolved_precision
from llp_pretrain.data import DataLayoutError, TrainStream, make_train_loader, read_split_stream
from llp_pretrain.evaluate import bytes_per_token, score_windows, summarize, window_plan
from llp_pretrain.monitor import Monitor, format_eta, measure_peak_flops, memory_gb
from llp_pretrain.run_identity import check_resume_identity, clear_run, hold_run_lock, run_hashes, start_point
from llp_pretrain.schedule import lr_at, resumed_schedule, schedule_meta

__all__ = ["DistInfo", "setup_distributed", "lr_at", "compute_loss", "SequenceParallelContext",
           "build_parallel_context", "train", "TrainResult"]

#: Test hook: after this many optimizer steps the process stops making progress (sleeps) so a
#: test can SIGKILL or SIGTERM it at a known point. Never set in normal use.
PAUSE_ENV = "LLP_PRETRAIN_PAUSE_AFTER_STEP"


@dataclass
class DistInfo:
    """Process layout: global ``rank``/``world_size``, ``local_rank``, ``dp_rank``/``dp_size``,
    ``sp_rank``/``sp_size`` (sequence parallel), and the torch ``device``."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: seconds the process-group initialisation may take before the process gives up with a message
#: (environment variable ``LLP_DIST_INIT_TIMEOUT_S`` overrides)
DIST_INIT_TIMEOUT_S = 300.0


class DistributedInitError(RuntimeError):
    """The default process group could not be formed; the message (one line) says what was awaited."""


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
    advice = (f"check that all {world} ranks were started and can reach {addr}:{port} (same "
              f"MASTER_ADDR/MASTER_PORT and world size everywhere, no firewall), or raise LLP_DIST_INIT_TIMEOUT_S")

    def give_up() -> None:
        print(f"[llp-pretrain] error: {what} for {timeout_s:.0f} s and gave up; {advice}", file=sys.stderr,
              flush=True)
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


def setup_distributed(sequence_parallel_size: int = 1) -> DistInfo:
    """Initialise the default process group (idempotent) and return the layout.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; when ``RANK`` is
    unset, sets up a single process (127.0.0.1, a free port). Backend: NCCL with CUDA, else gloo.
    Initialisation is bounded by ``LLP_DIST_INIT_TIMEOUT_S`` (default :data:`DIST_INIT_TIMEOUT_S`)
    and safe across torchrun worker restarts (:func:`_init_process_group`).
    Raises ``ValueError`` if the world size is not a multiple of ``sequence_parallel_size`` or
    ``LLP_DIST_INIT_TIMEOUT_S`` is not a positive number, :class:`DistributedInitError` if the group
    cannot be formed."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ["LOCAL_RANK"])
    raw_timeout = os.environ.get("LLP_DIST_INIT_TIMEOUT_S", str(DIST_INIT_TIMEOUT_S))
    try:
        timeout_s = float(raw_timeout)
    except ValueError:
        timeout_s = -1.0
    if not timeout_s > 0:
        raise ValueError(f"LLP_DIST_INIT_TIMEOUT_S={raw_timeout!r} is not a positive number of seconds")
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
    if world % sequence_parallel_size:
        raise ValueError(f"world size {world} is not a multiple of parallel.sequence_parallel_size "
                         f"{sequence_parallel_size}")
    sp = sequence_parallel_size
    return DistInfo(rank, world, local_rank, rank // sp, world // sp, rank % sp, sp, device)


class SequenceParallelContext:
    """Plug point for ``llp_pretrain.parallel``: what the engine needs from sequence parallelism.

    ``mpu``: object passed to ``deepspeed.initialize`` (sequence/data-parallel groups) or None;
    ``seq_parallel``: per-step object handed to the model (``docs/internals.md``) or None;
    ``local_chunk(tokens)``: this rank's slice of a ``(B, N + 1)`` batch;
    ``reduce_loss(loss_sum, n_tokens)``: sums over the sequence-parallel group.
    With ``sequence_parallel_size == 1`` all of these are identities."""

    mpu = None
    seq_parallel = None

    def local_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def reduce_loss(self, loss_sum: torch.Tensor, n_tokens: int) -> Tuple[torch.Tensor, int]:
        return loss_sum, n_tokens

    def prepare_model(self, model, ds_config: Dict[str, Any]):
        """Called right before ``deepspeed.initialize`` (after the optimizer exists); may convert
        the model in place (e.g. ZeRO-3 partitioning over the right group). Returns the model."""
        return model


def build_parallel_context(cfg: RunConfig, dist_info: DistInfo) -> SequenceParallelContext:
    """The sequence-parallel context for this run. ``P == 1``: identities. ``P > 1``: built by
    ``llp_pretrain.parallel.engine_context(cfg, dist_info)`` when that package provides it.

    Raises ``NotImplementedError`` with what is missing otherwise."""
    if dist_info.sp_size == 1:
        return SequenceParallelContext()
    try:
        from llp_pretrain.parallel import engine_context  # provided by the sequence-parallel package
    except ImportError as e:
        raise NotImplementedError(
            f"parallel.sequence_parallel_size={dist_info.sp_size} needs llp_pretrain.parallel.engine_context "
            f"(not available: {e}); run with sequence_parallel_size: 1") from e
    return engine_context(cfg, dist_info)


def compute_loss(model, tokens: torch.Tensor, sp: Optional[SequenceParallelContext] = None):
    """Mean next-token loss of one micro-batch.

    Args:
        model: the DeepSpeed engine (or module); called as ``model(input_ids, seq_parallel=...)``.
        tokens: ``(B, N + 1)`` int64 shard samples (the full sequence; ``sp`` slices its chunk).
        sp: sequence-parallel context (identity when None).

    Returns ``(loss, loss_sum, n_tokens)``: ``loss = loss_sum / n_tokens`` (nats per token; the value
    to backpropagate), summed over the sequence-parallel group."""
    from llp_pretrain.models import lm_loss

    sp = sp or SequenceParallelContext()
    kwargs = {"seq_parallel": sp.seq_parallel} if sp.seq_parallel is not None else {}
    loss_sum, n = lm_loss(model, sp.local_chunk(tokens), **kwargs)
    loss_sum, n = sp.reduce_loss(loss_sum, n)
    return loss_sum / n, loss_sum, n


@dataclass
class TrainResult:
    """Outcome of :func:`train`: final ``step``, last logged ``loss``, ``stopped_by``
    (``max_steps``/``signal``/``time_limit``), ``skipped_steps``, last ``val`` metrics, run dir."""

    step: int
    loss: Optional[float]
    stopped_by: str
    skipped_steps: int
    val: Optional[Dict[str, float]]
    run_dir: str


class _Signals:
    """Sets a flag on SIGTERM/SIGUSR1 (checked every step, agreed on by all ranks)."""

    def __init__(self):
        self.flag = False
        self.signum = None
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.flag = True
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class _AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose next ``step()`` can be skipped (non-finite step under ZeRO-0)."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def _make_optimizer(model, cfg: RunConfig):
    t = cfg.train
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    zero = cfg.ds_config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, adamw_mode=True)
    if int(zero.get("stage", 0)) == 0 and resolved_precision(t) == "fp32":
        return _AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)  # DeepSpeed calls it directly
    # ZeRO 1-3 and bf16 wrap the optimizer (and skip overflowing steps themselves); DeepSpeed only
    # accepts the stock class there
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def _layout_meta(cfg: RunConfig, d: DistInfo) -> Dict[str, Any]:
    return {"world_size": d.world_size, "data_parallel_size": d.dp_size, "sequence_parallel_size": d.sp_size,
            "micro_batch_size": cfg.train.micro_batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
            "num_workers": cfg.data.num_workers, "seed": cfg.train.seed, "shuffle_buffer": cfg.data.shuffle_buffer}


def check_resume_layout(meta: Dict[str, Any], cfg: RunConfig, d: DistInfo, where: str) -> None:
    """Fail up front (``ValueError``) when a checkpoint's layout differs from this run's in a way
    that breaks exact resume, saying how to proceed."""
    old, new = meta.get("layout", {}), _layout_meta(cfg, d)
    if old.get("data_parallel_size") != new["data_parallel_size"] or old.get("sequence_parallel_size") != new["sequence_parallel_size"]:
        raise ValueError(
            f"{where} was written with data_parallel_size={old.get('data_parallel_size')} x "
            f"sequence_parallel_size={old.get('sequence_parallel_size')} (world {old.get('world_size')}); this run has "
            f"data_parallel_size={new['data_parallel_size']} x sequence_parallel_size={new['sequence_parallel_size']} "
            f"(world {new['world_size']}). ZeRO optimizer states and the data position are per data-parallel rank, so it "
            f"cannot be resumed exactly. Either relaunch with {old.get('world_size')} processes, or convert it: "
            f"`llp-pretrain export {where} WEIGHTS_DIR` and start a new run with `--set train.init_from=WEIGHTS_DIR` "
            f"(weights kept; optimizer state, LR schedule and data position start afresh).")
    diffs = [k for k in ("micro_batch_size", "grad_accum_steps", "num_workers", "seed", "shuffle_buffer")
             if old.get(k) != new[k]]
    if diffs:
        raise ValueError(f"{where} was written with " + ", ".join(f"{k}={old.get(k)}" for k in diffs)
                         + "; this run has " + ", ".join(f"{k}={new[k]}" for k in diffs)
                         + ". The data position depends on them: resume with the checkpoint's values "
                         + "(see its config.resolved.yaml) or start a new run with train.init_from.")


def _gather_context(engine, stage: int):
    if stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return nullcontext()


def _all_reduce(values, op="sum", device=None):
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def train(cfg: RunConfig, resume: Optional[str] = None, overwrite: bool = False) -> TrainResult:
    """Run (or resume) the training job ``cfg``; see the module docstring.

    ``resume``: None (fresh start; refused when the run directory already holds checkpoints), ``"auto"``
    or a checkpoint path. ``overwrite``: delete the run directory's checkpoints and TensorBoard events
    first and start afresh.

    Raises ``ValueError`` for a reused run directory, a layout, model or data mismatch on resume
    (before anything is built), ``FloatingPointError`` after ``train.max_nonfinite_steps``
    non-finite steps in a row."""
    import deepspeed
    import torch.distributed as dist

    from llp_pretrain.models import build_model

    d = setup_distributed(cfg.parallel.sequence_parallel_size)
    t = cfg.train
    run_dir = Path(cfg.run.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    tokenizer_path = resolve_tokenizer(cfg.data, cfg.manifest)
    hashes = run_hashes(cfg, tokenizer_path)
    resolved = cfg.to_dict()
    # every check that can refuse the start runs before anything is written or built
    where = start_point(run_dir, resume, overwrite)
    meta, data_start = None, 0
    if where is not None:
        meta = ckpt.read_meta(where[0] / where[1])
        check_resume_layout(meta, cfg, d, str(where[0] / where[1]))
        data_start = check_resume_identity(meta, resolved["model"], hashes, t.allow_data_change,
                                           str(where[0] / where[1]))
        ckpt.check_loadable(where[0] / where[1])
    lr_fn, lr_anchor = resumed_schedule(t, meta, str(where[0] / where[1]) if where else "")
    if where is not None:
        if int(meta["step"]) >= t.max_steps:
            if d.rank == 0:
                print(f"[llp-pretrain] {where[0] / where[1]} is already at step {meta['step']} >= train.max_steps "
                      f"{t.max_steps}: nothing to do", flush=True)
            return TrainResult(step=int(meta["step"]), loss=None, stopped_by="max_steps",
                               skipped_steps=int(meta.get("skipped_steps", 0)), val=None, run_dir=str(run_dir))
    _hold_run_dir(run_dir, d)
    if d.rank == 0:
        if overwrite:
            clear_run(run_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    if tokenizer_path is None and d.rank == 0:
        print(f"[llp-pretrain] warning: no tokenizer.model matching {cfg.data.path}/manifest.json found next to "
              f"the shards or where the manifest says; text samples are shown as ids and the run directory gets "
              f"no tokenizer (set data.tokenizer=PATH)", flush=True)
    if d.rank == 0:
        dump_yaml(resolved, run_dir / "config.resolved.yaml")
        ckpt.write_json_atomic(run_dir / "ds_config.json", cfg.ds_config)
        ckpt.write_json_atomic(run_dir / "hashes.json", hashes)
        if tokenizer_path is not None and Path(tokenizer_path).is_file():
            import shutil

            shutil.copyfile(tokenizer_path, run_dir / ".tokenizer.model.tmp")
            os.replace(run_dir / ".tokenizer.model.tmp", run_dir / "tokenizer.model")

    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2 ** 32)
    model = build_model(cfg.model)
    init_from = getattr(t, "init_from", None)
    if init_from and where is None:
        from llp_pretrain.export import load_exported_weights

        load_exported_weights(model, init_from)  # ValueError naming mismatched tensors
    torch.manual_seed(t.seed + d.rank)  # dropout differs across ranks; restored exactly on resume

    n_params = model.num_params()
    seq_len = cfg.model.seq_len
    flops_tok = model.flops_per_token(seq_len)
    sp = build_parallel_context(cfg, d)
    optimizer = _make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_fn(s) / t.lr)
    model = sp.prepare_model(model, cfg.ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=cfg.ds_config, mpu=sp.mpu, dist_init_required=False)
    stage = int(cfg.ds_config.get("zero_optimization", {}).get("stage", 0))

    step, skipped_total = 0, 0
    if where is not None:
        with ckpt.weights_only_loads():  # DeepSpeed's torch.load calls cannot unpickle code
            load_path, client = engine.load_checkpoint(str(where[0]), tag=where[1], load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {where[0] / where[1]}")
        step = int(meta["step"])
        skipped_total = int(meta.get("skipped_steps", 0))
        if d.rank == 0:
            print(f"[llp-pretrain] resumed from {where[0] / where[1]} at step {step}", flush=True)

    accum = t.grad_accum_steps
    stream = TrainStream(cfg.data.path, d.dp_size, d.dp_rank, cfg.data.num_workers, t.micro_batch_size, t.seed,
                         cfg.data.shuffle_buffer, consumed_batches=(step - data_start) * accum,
                         manifest=cfg.manifest, verify_checksums=cfg.data.verify_checksums,
                         on_corrupt=cfg.data.on_corrupt)
    prec = resolved_precision(t)
    # measured before the loader's workers start, so they do not compete with the measurement
    peak = t.peak_flops or measure_peak_flops(d.device, torch.bfloat16 if prec == "bf16" and d.device.type == "cuda"
                                              else torch.float32)
    loader = iter(make_train_loader(stream))
    if where is not None:
        # restored last: building the engine, measuring the peak and starting the loader's iterator all
        # draw from the global RNGs, so restoring earlier would shift dropout against the uninterrupted run
        ckpt.load_rank_rng(where[0] / where[1], d.rank)

    # a fresh start hides events a killed earlier attempt left at any step (purge from step 1)
    monitor = Monitor(run_dir / "tensorboard", d.rank, purge_step=step + 1)
    if where is None:
        hp = {**{f"model.{k}": v for k, v in resolved["model"].items()},
              **{f"train.{k}": v for k, v in resolved["train"].items()},
              "zero_stage": stage, "world_size": d.world_size, "data_parallel_size": d.dp_size,
              "sequence_parallel_size": d.sp_size, "params": n_params, "peak_flops": peak, "precision": prec}
        monitor.hparams(hp, {"val/loss": float("nan"), "val/ppl": float("nan")})
    monitor.console(f"[llp-pretrain] {cfg.model.variant} {n_params / 1e6:.2f}M params | world {d.world_size} "
                    f"(dp {d.dp_size} x sp {d.sp_size}) | ZeRO-{stage} | {prec} | global batch {t.global_batch_size} "
                    f"= {t.micro_batch_size} x {accum} x {d.dp_size} | seq_len {seq_len} | steps {step}->{t.max_steps}")

    # validation windows (this dp rank's share; same count on every rank for ZeRO-3's collective forward)
    val_cache: Dict[str, Any] = {}

    def run_eval() -> Optional[Dict[str, float]]:
        if val_cache.get("unavailable"):
            return None
        if "plan" not in val_cache:
            trained = model.trained_positions(seq_len)
            tlen = trained.stop - trained.start
            try:
                stream_np = read_split_stream(cfg.data.path, "val", cfg.manifest,
                                              max_samples=cfg.data.val_samples + 1,
                                              verify_checksums=cfg.data.verify_checksums)
                plan = window_plan(len(stream_np), seq_len, tlen, tlen)[: cfg.data.val_samples]
            except (DataLayoutError, ValueError) as e:  # same data on every rank: all skip together
                monitor.console(f"[llp-pretrain] warning: no validation during training ({e})")
                val_cache["unavailable"] = True
                return None
            val_cache.update(stream=torch.from_numpy(stream_np), plan=plan[d.dp_rank::d.dp_size], tlen=tlen,
                             n_batches=math.ceil(math.ceil(len(plan) / d.dp_size) / t.micro_batch_size))
        engine.eval()
        try:
            nll, n = score_windows(lambda x: engine(x), val_cache["stream"], val_cache["plan"], seq_len,
                                   val_cache["tlen"], t.micro_batch_size, d.device, pad_to=val_cache["n_batches"])
        finally:
            engine.train()
        nll_all, n_all = _all_reduce([nll, n], device=d.device if d.device.type == "cuda" else None)
        # sequence-parallel peers scored the same windows: divide the double count
        res = summarize(nll_all / d.sp_size, int(n_all / d.sp_size), bytes_per_token(cfg.manifest, "val"))
        return res.to_dict()

    def sample_text() -> Optional[str]:
        if t.sample_tokens <= 0:
            return None
        try:
            import sentencepiece as spm

            sp_model = spm.SentencePieceProcessor(model_file=str(tokenizer_path)) if tokenizer_path else None
        except Exception:
            sp_model = None
        prompt = sp_model.encode(t.sample_prompt) if sp_model else [4, 5, 6]
        with _gather_context(engine, stage):
            out = engine.module.generate(torch.tensor(prompt), t.sample_tokens, temperature=0.8, top_k=40,
                                         seed=t.seed, eos_id=3)
        ids = out.tolist()
        return sp_model.decode(ids) if sp_model else " ".join(map(str, ids))

    def save(step_now: int) -> None:
        tag = ckpt.tag_for(step_now)
        client = {"step": step_now, "layout": _layout_meta(cfg, d)}
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
        tag_dir = ckpt_dir / tag
        ckpt.save_rank_rng(tag_dir, d.rank)
        dist.barrier()
        if d.rank == 0:
            dump_yaml(resolved, tag_dir / "config.resolved.yaml")
            ckpt.write_json_atomic(tag_dir / "ds_config.json", cfg.ds_config)
            meta_new = {"step": step_now, "consumed_batches_per_rank": step_now * accum,
                        "consumed_samples": step_now * t.global_batch_size, "skipped_steps": skipped_total,
                        "layout": _layout_meta(cfg, d), "zero_stage": stage, "model": resolved["model"],
                        "hashes": hashes, "data_start_step": data_start,
                        "schedule": schedule_meta(t, lr_anchor), "time": time.time()}
            ckpt.finalize_save(ckpt_dir, tag, meta_new, t.keep_checkpoints)
        dist.barrier()
        monitor.console(f"[llp-pretrain] saved checkpoint {tag_dir}")

    save = ckpt.reporting_full_disk(save, ckpt_dir)  # a full disk: one clear line, `latest` unchanged

    signals = _Signals()
    pause_after = int(os.environ.get(PAUSE_ENV, "-1"))
    t_start = time.time()
    last_loss, val, stopped_by = None, None, "max_steps"
    nonfinite_run = 0
    win = {"time": 0.0, "wait": 0.0, "steps": 0, "loss": 0.0, "loss_steps": 0}
    warned_mfu = False
    rdev = d.device if d.device.type == "cuda" else None
    steps_this_run = 0
    grad_norm0 = None
    last_saved = step if where is not None else -1
    try:
        while step < t.max_steps:
            t0 = time.perf_counter()
            wait = 0.0
            loss_acc, bad = 0.0, 0.0
            for micro in range(accum):
                tw = time.perf_counter()
                batch = next(loader)
                wait += time.perf_counter() - tw
                tokens = batch["tokens"].to(d.device, non_blocking=True)
                loss, _, _ = compute_loss(engine, tokens, sp)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    bad = 1.0
                else:
                    loss_acc += lv
                if micro == accum - 1:
                    # agree on skipping before the optimizer step (all ranks, every step)
                    bad_any, = _all_reduce([bad], op="max", device=rdev)
                    if bad_any:
                        loss = loss * 0.0  # keeps DeepSpeed's hooks/bookkeeping; grads are discarded below
                engine.backward(loss)
                if micro == accum - 1:
                    if bad_any:
                        _discard_step(engine, stage if prec == "fp32" else -1)
                        grad_norm0 = float("nan")
                    elif stage == 0:  # DeepSpeed reports no norm for ZeRO-0: reduced grads are local
                        grad_norm0 = _grad_norm(engine.module)
                    lr_applied = engine.get_lr()[0]  # the LR this optimizer step uses
                engine.step()
            step += 1
            steps_this_run += 1
            if bad_any:
                skipped_total += 1
                nonfinite_run += 1
                if nonfinite_run >= t.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{nonfinite_run} non-finite training steps in a row (last at step {step}); lower train.lr, "
                        f"raise train.warmup_steps or check the data; resume from the last checkpoint with --resume auto")
            else:
                nonfinite_run = 0
                win["loss"] += loss_acc / accum
                win["loss_steps"] += 1
            dt = time.perf_counter() - t0
            win["time"] += dt
            win["wait"] += wait
            win["steps"] += 1

            if step % t.log_interval == 0 or step == t.max_steps:
                red = _all_reduce([win["loss"], win["loss_steps"]], device=rdev)
                mean_loss = red[0] / red[1] if red[1] else float("nan")
                last_loss = mean_loss
                step_time = win["time"] / win["steps"]
                tok_s = t.global_batch_size * seq_len / step_time
                mfu = flops_tok * tok_s / (peak * d.world_size)
                if mfu > 1.0 and not t.peak_flops and not warned_mfu:
                    warned_mfu = True
                    monitor.console(f"[llp-pretrain] warning: MFU {100 * mfu:.0f}% > 100%: the start-up peak "
                                    f"measurement ({peak / 1e9:.1f} GFLOP/s per rank) was slowed by other load on "
                                    f"this machine; set train.peak_flops to the device's peak FLOP/s")
                gn = grad_norm0 if stage == 0 else engine.get_global_grad_norm()
                lr_now = lr_applied
                monitor.scalars(step, {
                    "train/loss": mean_loss, "train/lr": lr_now,
                    "train/grad_norm": float(gn) if gn is not None else None,
                    "train/tokens_per_sec": tok_s, "train/mfu": mfu, "train/step_time": step_time,
                    "train/data_wait_fraction": win["wait"] / max(win["time"], 1e-12),
                    "train/memory_gb": memory_gb(), "train/skipped_steps": skipped_total,
                })
                eta = step_time * (t.max_steps - step)
                monitor.console(f"step {step:>7d}/{t.max_steps} | loss {mean_loss:.4f} | lr {lr_now:.3e} | "
                                f"grad_norm {float(gn) if gn is not None else float('nan'):.3f} | {tok_s:,.0f} tok/s | "
                                f"mfu {100 * mfu:.1f}% | eta {format_eta(eta)}")
                monitor.flush()
                win = {"time": 0.0, "wait": 0.0, "steps": 0, "loss": 0.0, "loss_steps": 0}

            # periodic evaluation, unless the final one is only a few steps away
            if t.eval_interval and step % t.eval_interval == 0 and step <= t.max_steps - max(1, t.eval_interval // 4):
                val = run_eval()
                _log_val(monitor, step, val, sample_text())

            if t.save_interval and step % t.save_interval == 0 and step < t.max_steps:
                save(step)
                last_saved = step
            if step == pause_after:  # test hook: wait here until killed, or until any rank is signalled
                while not _all_reduce([float(signals.flag)], op="max", device=rdev)[0]:
                    time.sleep(0.05)

            # stop requests: signal on any rank or time limit on rank 0 (agreed by all ranks)
            over_time = t.time_limit_minutes is not None and (time.time() - t_start) > 60 * t.time_limit_minutes
            stop_sig, stop_time = _all_reduce([float(signals.flag), float(over_time)], op="max", device=rdev)
            if stop_sig or stop_time:
                stopped_by = "signal" if stop_sig else "time_limit"
                break
        if stopped_by == "max_steps" or stopped_by == "time_limit":
            val = run_eval()
            _log_val(monitor, step, val, sample_text())
        if step != last_saved:
            save(step)
        if stopped_by == "signal":
            monitor.console(f"[llp-pretrain] stopped by signal at step {step} after saving; resume with --resume auto")
    finally:
        # drop the only reference to the loader's iterator: its workers are shut down now, also when
        # an error (e.g. a corrupt shard read by a worker) is on its way out, not left for the
        # interpreter's exit handler
        loader = None  # noqa: F841
        monitor.close()
        signals.restore()
    return TrainResult(step=step, loss=last_loss, stopped_by=stopped_by, skipped_steps=skipped_total, val=val,
                       run_dir=str(run_dir))


def _hold_run_dir(run_dir: Path, d: DistInfo) -> None:
    """Rank 0 takes the run directory's lock (:func:`~llp_pretrain.run_identity.hold_run_lock`); every
    rank learns the outcome (one all-reduce), so a refusal ends all ranks, none waits at a barrier.
    Raises ``ValueError``."""
    import torch.distributed as dist

    err = ""
    if d.rank == 0:
        try:
            hold_run_lock(run_dir)
        except ValueError as e:
            err = str(e)
    flag = torch.tensor([1.0 if err else 0.0], device=d.device if d.device.type == "cuda" else None)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise ValueError(err or f"{run_dir} is in use by another training process (see rank 0's message)")


def _grad_norm(module) -> float:
    """Global L2 norm of the (already data-parallel reduced) gradients of ``module``."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _discard_step(engine, stage: int) -> None:
    """Make the coming ``engine.step()`` leave parameters and optimizer moments untouched.

    ZeRO-0 in fp32 (our AdamW): gradients are zeroed (so clipping sees finite values) and the optimizer's
    next step is skipped; the LR schedule still advances. ZeRO 1-3 and bf16 (``stage=-1``): the non-finite loss already
    made the reduced gradients non-finite on every rank, which DeepSpeed treats as an overflow: it
    skips the update and zeroes the gradients itself."""
    if stage == 0:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        opt = engine.optimizer
        while not isinstance(opt, _AdamW) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, _AdamW):
            raise RuntimeError("cannot skip a non-finite step: unexpected optimizer wrapper "
                               f"{type(engine.optimizer).__name__}")
        opt.skip_next = True


def _log_val(monitor: Monitor, step: int, val: Optional[Dict[str, float]], sample: Optional[str]) -> None:
    if val is None:
        return
    monitor.scalars(step, {"val/loss": val["loss"], "val/ppl": val["ppl"], "val/bits_per_byte": val["bits_per_byte"]})
    monitor.console(f"eval  {step:>7d} | val loss {val['loss']:.4f} | ppl {val['ppl']:.2f} | "
                    f"bpb {val['bits_per_byte'] if val['bits_per_byte'] is not None else float('nan'):.4f} | "
                    f"{val['tokens']} tokens")
    if sample is not None:
        monitor.text("samples/generated", sample, step)
        monitor.console(f"sample {step:>6d} | {sample!r}")
    monitor.flush()
