"""Run configuration: one YAML file per run, ``--set key.sub=value`` overrides, validation in one pass.

A run YAML has the sections ``model`` (:class:`llp_pretrain.models.ModelConfig`), ``data``,
``train``, ``parallel``, ``deepspeed`` (path of a standard DeepSpeed JSON) and ``run``
(see ``docs/internals.md``). :func:`load_config` parses the file, applies overrides and validates
every section, the cross-field rules and the DeepSpeed JSON, collecting *all* problems before
raising a single :class:`ConfigError` that names the file, line and key of each one (unknown keys
come with the nearest valid name).

Cross-field rules (``world_size`` = number of processes, ``P`` = ``sequence_parallel_size``):

* ``data_parallel_size = world_size / P`` (``world_size`` divisible by ``P``; ``P > 1`` only for
  ``model.variant: llp``, with ``seq_len`` a multiple of ``P * segment_len``);
* ``global_batch_size == micro_batch_size * grad_accum_steps * data_parallel_size`` (the one
  missing is derived; both given must agree);
* ``model.seq_len`` equals the shards' manifest ``seq_len``; ``model.vocab_size`` is at least the
  tokenizer's piece count (``vocab_size: auto`` takes the piece count from the manifest);
* the DeepSpeed JSON's batch fields, ``gradient_clipping`` and precision sections, when present,
  agree with the YAML (which is the one source of truth and fills them in when absent).
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ConfigError",
    "DataConfig",
    "TrainConfig",
    "ParallelConfig",
    "RunSection",
    "RunConfig",
    "load_config",
    "parse_overrides",
    "find_config_file",
    "configs_dir",
    "read_manifest",
]

SECTIONS = ("model", "data", "train", "parallel", "deepspeed", "run")


class ConfigError(ValueError):
    """Raised with every problem found in a run config, one per line.

    ``problems`` is the list of ``(location, message)`` pairs; ``str(err)`` lists them all.
    """

    def __init__(self, source: str, problems: List[Tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in run config {source}:"]
        lines += [f"  - {loc}: {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """``data`` section: where the shards are and how they are streamed."""

    path: str = Field(description="dataset directory written by `llp-prep shard` (holds manifest.json)")
    tokenizer: Optional[str] = Field(
        None, description="SentencePiece tokenizer.model; default: DIR/tokenizer.model next to or above the shards")
    num_workers: int = Field(1, ge=0, description="dataloader worker processes per rank (0 = in-process)")
    shuffle_buffer: int = Field(1000, ge=1, description="samples held in each worker's shuffle buffer")
    val_samples: int = Field(64, ge=1, description="validation windows scored at each evaluation during training")
    verify_checksums: bool = Field(
        True, description="check each sample's tokens against the blake2b checksum llp-prep stored in its json")
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="a sample or shard that fails validation: fail = stop the run naming it; "
                            "skip = log it, count it and go on without it (docs/training.md)")


class TrainConfig(_Strict):
    """``train`` section: optimisation, schedule, logging and checkpoint cadence (all in optimizer steps)."""

    max_steps: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0, description="samples per rank per forward/backward")
    global_batch_size: Optional[int] = Field(None, gt=0, description="samples per optimizer step, all ranks")
    grad_accum_steps: Optional[int] = Field(None, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0 = off)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    seed: int = 1234
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(0, ge=0, description="0 = only at the end")
    save_interval: int = Field(500, ge=0, description="0 = only at the end and on SIGTERM/SIGUSR1")
    keep_checkpoints: int = Field(3, ge=1)
    max_nonfinite_steps: int = Field(5, ge=1, description="abort after this many non-finite steps in a row")
    peak_flops: Optional[float] = Field(None, gt=0, description="per-device peak FLOP/s for MFU; default measured")
    sample_prompt: str = "In the beginning"
    sample_tokens: int = Field(48, ge=0, description="tokens generated for the TensorBoard text sample at each eval")
    time_limit_minutes: Optional[float] = Field(None, gt=0, description="save and stop after this wall time")
    init_from: Optional[str] = Field(None, description="exported weights dir (`llp-pretrain export`) to start from")


class ParallelConfig(_Strict):
    """``parallel`` section."""

    sequence_parallel_size: int = Field(1, ge=1)


class RunSection(_Strict):
    """``run`` section."""

    output_dir: str


class RunConfig(BaseModel):
    """The validated run config. ``model`` is a :class:`llp_pretrain.models.ModelConfig`.

    Derived fields (filled by :func:`load_config`): ``world_size``, ``data_parallel_size``,
    ``train.grad_accum_steps``, ``train.global_batch_size``, ``ds_config`` (the resolved DeepSpeed
    dict), ``source`` (the YAML path) and ``deepspeed`` (resolved absolute JSON path).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: Any
    data: DataConfig
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()
    deepspeed: str
    run: RunSection
    world_size: int = 1
    data_parallel_size: int = 1
    ds_config: Dict[str, Any] = Field(default_factory=dict)
    source: str = "<dict>"
    manifest: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        """The resolved run config as plain data (what ``config.resolved.yaml`` holds)."""
        out = {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json"),
            "parallel": self.parallel.model_dump(mode="json"),
            "deepspeed": self.deepspeed,
            "run": self.run.model_dump(mode="json"),
        }
        return out


# --------------------------------------------------------------------------------------------
# file lookup

def configs_dir() -> Optional[Path]:
    """Directory of the shipped configs: ``<repo>/configs`` for a checkout or editable install,
    else the installed package data ``llp_pretrain.configs`` (setup.py maps it to ``configs/``)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "configs"):  # checkout / editable; installed package data
        if (cand / "deepspeed").is_dir():
            return cand
    return None


def find_config_file(name: str, relative_to: Optional[Path] = None) -> Path:
    """Resolve a config path: as given (absolute or from the working directory), then relative
    to ``relative_to`` (the referencing YAML's folder), then in the shipped configs (with or
    without a leading ``configs/``). Raises ``FileNotFoundError`` listing the places tried."""
    p = Path(name).expanduser()
    tried = [p]
    if p.is_file():
        return p.resolve()
    if not p.is_absolute():
        if relative_to is not None:
            q = relative_to / p
            tried.append(q)
            if q.is_file():
                return q.resolve()
        shipped = configs_dir()
        if shipped is not None:
            rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "configs" else p
            for q in (shipped / rel, shipped.parent / p):
                tried.append(q)
                if q.is_file():
                    return q.resolve()
    raise FileNotFoundError(f"config file {name!r} not found (tried: {', '.join(str(t) for t in tried)})")


def read_manifest(path: str | os.PathLike) -> Dict[str, Any]:
    """Read ``DIR/manifest.json`` of a dataset directory (``docs/internals.md``).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or unreadable.
    """
    m = Path(path) / "manifest.json"
    if not m.is_file():
        raise FileNotFoundError(f"{m}: no manifest.json; is {path} a dataset directory written by `llp-prep shard`?")
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{m}: line {e.lineno}: not valid JSON ({e.msg}); rerun `llp-prep shard`") from e
    if data.get("format_version") != 1:
        raise ValueError(f"{m}: format_version {data.get('format_version')!r} is not supported (expected 1)")
    return data


# --------------------------------------------------------------------------------------------
# YAML with line numbers

def _line_map(text: str) -> Dict[str, int]:
    """Map dotted key paths of a YAML mapping to their 1-based line numbers."""
    out: Dict[str, int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return out


def parse_overrides(items: List[str]) -> List[Tuple[List[str], Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars/lists (``3``, ``1e-3``, ``true``,
    ``[0.9, 0.95]``, ``null``). Raises ``ConfigError`` listing every malformed item."""
    parsed, problems = [], []
    for item in items:
        if "=" not in item:
            problems.append((f"--set {item}", "expected key.sub=value"))
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            problems.append((f"--set {item}", "empty key"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as e:
            problems.append((f"--set {item}", f"value is not valid YAML ({e})"))
            continue
        parsed.append((key.split("."), value))
    if problems:
        raise ConfigError("--set", problems)
    return parsed


def _apply_override(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


# --------------------------------------------------------------------------------------------
# validation

def _suggest(name: str, valid) -> str:
    m = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(sorted(valid))}"


def _pydantic_problems(section: str, cls, err: ValidationError) -> List[Tuple[str, str]]:
    out = []
    fields = cls.model_fields.keys()
    for e in err.errors():
        loc = ".".join(str(x) for x in (section, *e["loc"]))
        if e["type"] == "extra_forbidden":
            out.append((loc, "unknown key" + _suggest(e["loc"][-1], fields)))
        elif e["type"] == "missing":
            out.append((loc, "required key is missing"))
        else:
            out.append((loc, f"{e['msg']} (got {e.get('input')!r})"))
    return out


def _model_config_cls():
    from llp_pretrain.models import ModelConfig  # imported late: models may be absent in partial installs

    return ModelConfig


def _find_tokenizer_json(data_path: Path) -> Optional[Path]:
    for cand in (data_path / "tokenizer.json", data_path.parent / "tokenizer" / "tokenizer.json",
                 data_path.parent / "tokenizer.json"):
        if cand.is_file():
            return cand
    return None


def resolve_tokenizer(data: DataConfig, manifest: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """The SentencePiece model for a run: ``data.tokenizer`` if set; else the first of
    ``tokenizer.model`` in the dataset directory, a sibling ``tokenizer/`` directory, the parent,
    and the path ``llp-prep shard`` recorded in the manifest (as given, or relative to the dataset
    directory) whose sha256 equals the manifest's tokenizer hash (any, without a manifest);
    None if there is none."""
    if data.tokenizer:
        return Path(data.tokenizer)
    from data_prep.tokenizer import file_sha256

    base = Path(data.path)
    tok = (manifest or {}).get("tokenizer", {})
    cands = [base / "tokenizer.model", base.parent / "tokenizer" / "tokenizer.model", base.parent / "tokenizer.model"]
    if tok.get("path"):
        cands += [Path(tok["path"]), base / tok["path"]]
    want = tok.get("sha256")
    for cand in cands:
        if cand.is_file() and (want is None or file_sha256(cand) == want):
            return cand
    return None


def load_config(path: str | os.PathLike | None = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None, *, raw: Optional[Dict[str, Any]] = None,
                check_data: bool = True) -> RunConfig:
    """Load, override and validate a run config.

    Args:
        path: the run YAML (looked up with :func:`find_config_file`), or None with ``raw``.
        overrides: ``["train.lr=1e-3", ...]`` applied in order after the YAML.
        world_size: number of processes; default ``$WORLD_SIZE`` or 1.
        raw: an already-parsed config dict (instead of ``path``).
        check_data: read the manifest/tokenizer of ``data.path`` for the cross checks.

    Returns:
        a :class:`RunConfig` with the derived fields filled in.

    Raises:
        ConfigError: every problem found, each with file, line and dotted key.
        FileNotFoundError: the YAML itself does not exist.
    """
    problems: List[Tuple[str, str]] = []
    lines: Dict[str, int] = {}
    if raw is None:
        src = find_config_file(str(path))
        text = src.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "?"
            raise ConfigError(str(src), [(where, f"not valid YAML: {e}")]) from e
        lines = _line_map(text)
        source = str(src)
        base_dir = src.parent
    else:
        raw = copy.deepcopy(raw)
        source = "<dict>"
        base_dir = Path.cwd()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [("<top>", "the run config must be a mapping of sections")])
    overridden = set()
    for key_path, value in parse_overrides(list(overrides or [])):
        _apply_override(raw, key_path, value)
        overridden.add(".".join(key_path))

    def where(loc: str) -> str:
        parts = loc.split(".")
        for i in range(len(parts), 0, -1):  # a value given with --set is reported as such, not by YAML line
            if ".".join(parts[:i]) in overridden:
                return f"{loc} (--set)"
        for i in range(len(parts), 0, -1):
            ln = lines.get(".".join(parts[:i]))
            if ln is not None:
                return f"{loc} (line {ln})"
        return loc

    for key in raw:
        if key not in SECTIONS:
            problems.append((str(key), "unknown section" + _suggest(key, SECTIONS)))
    for key in ("model", "data", "train", "deepspeed", "run"):
        if key not in raw:
            problems.append((key, "required section is missing"))

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))

    def section(name, cls):
        val = raw.get(name, {} if name == "parallel" else None)
        if val is None:
            return None
        if not isinstance(val, dict):
            problems.append((name, f"must be a mapping, got {type(val).__name__}"))
            return None
        try:
            return cls.model_validate(val)
        except ValidationError as e:
            problems.extend(_pydantic_problems(name, cls, e))
            return None

    data = section("data", DataConfig)
    train = section("train", TrainConfig)
    parallel = section("parallel", ParallelConfig)
    run = section("run", RunSection)

    # data: manifest and tokenizer
    manifest = None
    data_raw = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    data_path = data.path if data is not None else data_raw.get("path")
    if isinstance(data_path, str) and check_data:  # checked even when other data keys are wrong
        try:
            manifest = read_manifest(data_path)
        except (FileNotFoundError, ValueError) as e:
            problems.append(("data.path", str(e)))
        if data is not None and data.tokenizer and not Path(data.tokenizer).is_file():
            problems.append(("data.tokenizer", f"{data.tokenizer}: no such file"))

    # model
    model = None
    model_raw = raw.get("model")
    if isinstance(model_raw, dict):
        model_raw = dict(model_raw)
        piece_count = None
        if manifest is not None:
            piece_count = manifest.get("tokenizer", {}).get("piece_count")
        if model_raw.get("vocab_size") == "auto":
            if piece_count is None:
                problems.append(("model.vocab_size", "'auto' needs data.path with a manifest giving the tokenizer's "
                                 "piece_count; give a number or fix data.path"))
                model_raw["vocab_size"] = 1 << 16  # placeholder so the other model keys are still checked
            else:
                model_raw["vocab_size"] = int(piece_count)
        try:
            mcls = _model_config_cls()
        except ImportError as e:
            problems.append(("model", f"cannot import llp_pretrain.models ({e})"))
            mcls = None
        if mcls is not None:
            try:
                model = mcls.model_validate(model_raw)
            except ValidationError as e:
                problems.extend(_pydantic_problems("model", mcls, e))
            except ValueError as e:  # model configs may raise plain ValueErrors naming fields
                problems.append(("model", str(e)))
        if model is not None and manifest is not None:
            if int(manifest.get("seq_len", -1)) != int(model.seq_len):
                problems.append(("model.seq_len", f"{model.seq_len} differs from the shards' seq_len "
                                 f"{manifest.get('seq_len')} ({Path(data_path) / 'manifest.json'}); "
                                 "re-shard with `llp-prep shard --seq-len` or change model.seq_len"))
            if piece_count is not None and int(model.vocab_size) < int(piece_count):
                problems.append(("model.vocab_size", f"{model.vocab_size} is smaller than the tokenizer's piece count "
                                 f"{piece_count}; use vocab_size: auto or >= {piece_count}"))
    elif model_raw is not None:
        problems.append(("model", f"must be a mapping, got {type(model_raw).__name__}"))

    # layout and batch sizes
    dp = None
    if parallel is not None:
        sp = parallel.sequence_parallel_size
        if world_size % sp != 0:
            problems.append(("parallel.sequence_parallel_size",
                             f"{sp} does not divide the world size {world_size} (processes); "
                             f"launch a multiple of {sp} processes"))
        else:
            dp = world_size // sp
        if sp > 1 and model is not None and getattr(model, "variant", None) != "llp":
            problems.append(("parallel.sequence_parallel_size",
                             f"{sp} > 1 needs model.variant: llp (got {getattr(model, 'variant', None)!r})"))
        elif sp > 1 and model is not None and model.seq_len % (sp * model.segment_len) != 0:
            unit = sp * model.segment_len
            problems.append(("model.seq_len",
                             f"{model.seq_len} must be a multiple of sequence_parallel_size * segment_len = "
                             f"{sp} * {model.segment_len} = {unit} (each rank keeps whole segments); e.g. "
                             f"{max(unit, model.seq_len // unit * unit)}"))
    train_raw = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    batch_fields = {k: (getattr(train, k) if train is not None else train_raw.get(k))
                    for k in ("micro_batch_size", "grad_accum_steps", "global_batch_size")}
    batch_ok = isinstance(batch_fields["micro_batch_size"], int) and all(
        v is None or (isinstance(v, int) and v > 0) for v in batch_fields.values())
    if batch_ok and dp is not None:  # checked even when other train keys are wrong
        mb, ga, gb = (batch_fields[k] for k in ("micro_batch_size", "grad_accum_steps", "global_batch_size"))
        if ga is None and gb is None:
            ga = 1
        if ga is None:
            if gb % (mb * dp):
                problems.append(("train.global_batch_size",
                                 f"{gb} is not a multiple of micro_batch_size * data_parallel_size = {mb} * {dp}"))
            else:
                ga = gb // (mb * dp)
        if gb is None and ga is not None:
            gb = mb * ga * dp
        if ga is not None and gb != mb * ga * dp:
            problems.append(("train.global_batch_size",
                             f"{gb} != micro_batch_size * grad_accum_steps * data_parallel_size = "
                             f"{mb} * {ga} * {dp} = {mb * ga * dp}"))
        elif ga is not None and train is not None:
            train.grad_accum_steps = ga
            train.global_batch_size = gb
    if manifest is not None and data is not None and dp is not None:
        n_train = sum(1 for sh in manifest.get("shards", []) if sh.get("split") == "train")
        readers = dp * max(1, data.num_workers)
        if n_train < readers:
            problems.append(("data.num_workers", f"{n_train} train shard(s) cannot feed data_parallel_size={dp} x "
                             f"num_workers={max(1, data.num_workers)} = {readers} readers (each reads whole shards); "
                             "lower data.num_workers or re-shard with more, smaller shards "
                             "(`llp-prep shard --samples-per-shard`)"))
    if train is not None:
        if train.min_lr > train.lr:
            problems.append(("train.min_lr", f"{train.min_lr} is above train.lr {train.lr}"))

    # deepspeed JSON
    ds_path = raw.get("deepspeed")
    ds_config: Dict[str, Any] = {}
    ds_resolved = None
    if ds_path is not None:
        if not isinstance(ds_path, str):
            problems.append(("deepspeed", "must be the path of a DeepSpeed JSON file"))
        else:
            try:
                ds_resolved = find_config_file(ds_path, base_dir)
                ds_config = json.loads(ds_resolved.read_text(encoding="utf-8"))
                if not isinstance(ds_config, dict):
                    raise ValueError("top level must be an object")
            except FileNotFoundError as e:
                problems.append(("deepspeed", str(e)))
            except (ValueError, json.JSONDecodeError) as e:
                problems.append(("deepspeed", f"{ds_resolved}: not a valid DeepSpeed JSON ({e})"))
    if ds_config and train is not None and train.grad_accum_steps is not None:
        ds_config, ds_problems = _resolve_ds_config(ds_config, train, str(ds_resolved))
        problems.extend(ds_problems)

    if problems:
        raise ConfigError(source, [(where(loc), msg) for loc, msg in problems])
    return RunConfig(model=model, data=data, train=train, parallel=parallel,
                     deepspeed=str(ds_resolved), run=run, world_size=world_size,
                     data_parallel_size=dp, ds_config=ds_config, source=source, manifest=manifest)


def resolved_precision(train: TrainConfig) -> str:
    """``fp32`` or ``bf16``: ``auto`` means bf16 when CUDA is available, else fp32."""
    if train.precision != "auto":
        return train.precision
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def _resolve_ds_config(ds: Dict[str, Any], train: TrainConfig, where: str):
    """Fill/check the DeepSpeed JSON against the YAML. Returns (resolved dict, problems)."""
    ds = copy.deepcopy(ds)
    problems = []
    want = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": float(train.grad_clip),
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            problems.append((f"deepspeed:{key}", f"{where} says {have} but the run config gives {value}; "
                             "remove it from the JSON (or set it to \"auto\"): the YAML is the source of truth"))
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append((f"deepspeed:{key}", f"{where} has a '{key}' section; the optimizer (AdamW) and the "
                             "warmup+cosine schedule are set in the YAML `train` section, remove it"))
    prec = resolved_precision(train)
    if ds.get("fp16", {}).get("enabled") is True:
        problems.append(("deepspeed:fp16", f"{where} enables fp16; use train.precision: bf16 or fp32"))
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled", "auto") not in ("auto", prec == "bf16"):
        problems.append(("deepspeed:bf16.enabled", f"{where} says {bf16.get('enabled')} but train.precision "
                         f"resolves to {prec}; set it to \"auto\" or remove it"))
    ds["bf16"] = {**bf16, "enabled": prec == "bf16"}
    ds.pop("fp16", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds, problems


def dump_yaml(data: Dict[str, Any], path: Path) -> None:
    """Write ``data`` as YAML atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
