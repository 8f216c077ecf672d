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
* ``data_parallel_size`` divides the virtual data readers (``llp_pretrain.data_order``);
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
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from llp_pretrain.layout import LayoutError, ParallelLayout

if TYPE_CHECKING:  # the models package imports torch: resolved when a config is first loaded (_model_config_cls)
    from llp_pretrain.models import ModelConfig

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
    "read_yaml_file",
    "read_run_config",
    "output_dir_problem",
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


class DataSource(_Strict):
    """One entry of ``data.sources`` (a weighted mixture; docs/data_prep.md)."""

    path: str = Field(description="dataset directory written by `llp-prep shard`, or a URL prefix as data.path")
    weight: float = Field(gt=0, description="share of the training samples (normalised over the sources)")
    name: Optional[str] = Field(None, pattern=r"^[^/\s]+$", description="default: the last component of path")

    @model_validator(mode="after")
    def _default_name(self):
        if self.name is None:
            self.name = Path(self.path).name or "source"
        return self


class DataConfig(_Strict):
    """``data`` section: where the shards are (``path``, or a weighted mixture ``sources``) and how
    they are streamed."""

    path: Optional[str] = Field(None, description="dataset directory written by `llp-prep shard` (holds manifest.json), "
                                "or a URL prefix: http(s)://HOST/ds, file:///abs/ds, or pipe:CMD with {name} (e.g. "
                                "'pipe:aws s3 cp s3://bucket/ds/{name} -')")
    sources: Optional[List[DataSource]] = Field(None, min_length=1, description="weighted mixture, instead of path")
    tokenizer: Optional[str] = Field(
        None, description="SentencePiece tokenizer.model; default: DIR/tokenizer.model next to or above the shards")
    num_workers: int = Field(1, ge=0, description="dataloader worker processes per rank (0 = in-process)")
    shuffle_buffer: int = Field(1000, ge=1, description="samples held in shuffle buffers, split over the virtual readers")
    virtual_readers: Optional[int] = Field(
        None, ge=1, description="readers of the global sample order; default: the largest divisor of "
        "global_batch_size <= min(64, train shards); data_parallel_size must divide it (docs/training.md)")
    log_consumed: bool = Field(False, description="append each step's sample keys to RUN/consumed/rank{R:05d}.jsonl")
    val_samples: int = Field(64, ge=1, description="validation windows scored at each evaluation during training")
    verify_checksums: bool = Field(
        True, description="check each sample's tokens against the blake2b checksum llp-prep stored in its json")
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="a sample or shard that fails validation: fail = stop the run naming it; "
                            "skip = log it, count it and go on without it (docs/training.md)")

    @model_validator(mode="after")
    def _path_or_sources(self):
        if (self.path is None) == (self.sources is None):
            raise ValueError("give exactly one of data.path (one dataset) and data.sources (a weighted mixture)")
        names = [s.name for s in self.sources or []]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data.sources names {dup} occur more than once; set sources[i].name to tell them apart")
        return self

    @property
    def first_path(self) -> str:
        """``path``, or the first source's path (its manifest stands for all: same tokenizer and seq_len)."""
        return self.path if self.path is not None else self.sources[0].path


class TrainConfig(_Strict):
    """``train`` section: optimisation, schedule, logging and checkpoint cadence (all in optimizer steps)."""

    max_steps: int = Field(gt=0, lt=2**53)
    micro_batch_size: int = Field(gt=0, description="samples per rank per forward/backward")
    grad_accum_steps: Optional[int] = Field(None, gt=0)
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="samples per optimizer step, all ranks: micro_batch_size * grad_accum_steps * "
        "data_parallel_size (checked against the run's layout, given as validation context)")
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
    compile: bool = Field(False, description="run the model under torch.compile (DeepSpeed's engine.compile)")
    sample_prompt: str = "In the beginning"
    sample_tokens: int = Field(48, ge=0, description="tokens generated for the TensorBoard text sample at each eval")
    time_limit_minutes: Optional[float] = Field(None, gt=0, description="save and stop after this wall time")
    init_from: Optional[str] = Field(None, description="exported weights dir (`llp-pretrain export`) to start from")
    allow_data_change: bool = Field(
        False, description="on resume, accept a dataset whose manifest differs from the checkpoint's (curricula): "
        "logged, and the new data is read from its beginning")

    @field_validator("global_batch_size")
    @classmethod
    def _batch_rule(cls, gb: Optional[int], info: ValidationInfo) -> Optional[int]:
        """``global = micro * grad_accum * data_parallel_size`` for the layout in the validation context
        (``{"layout": ParallelLayout}``; without one, or with a wrong batch field, not checked here)."""
        layout = (info.context or {}).get("layout")
        if gb is not None and layout is not None and {"micro_batch_size", "grad_accum_steps"} <= info.data.keys():
            layout.batch(info.data["micro_batch_size"], info.data["grad_accum_steps"], gb)  # raises LayoutError
        elif gb is not None and info.data.get("micro_batch_size") and gb % info.data["micro_batch_size"]:
            # without a valid layout the data-parallel size is unknown, but this much always holds
            raise ValueError(f"{gb} is not a multiple of micro_batch_size {info.data['micro_batch_size']}")
        return gb

    @field_validator("min_lr")
    @classmethod
    def _min_lr_not_above_lr(cls, min_lr: float, info: ValidationInfo) -> float:
        lr = info.data.get("lr")
        if lr is not None and min_lr > lr:
            raise ValueError(f"{min_lr} is above train.lr {lr}")
        return min_lr


class ParallelConfig(_Strict):
    """``parallel`` section."""

    sequence_parallel_size: int = Field(1, ge=1)

    @field_validator("sequence_parallel_size")
    @classmethod
    def _divides_world(cls, sp: int, info: ValidationInfo) -> int:
        """The world size in the validation context (``{"world_size": N}``) must be a multiple of it."""
        world = (info.context or {}).get("world_size")
        why = ParallelLayout.problem(world, sp) if world is not None else None
        if why:
            raise ValueError(why)
        return sp


class RunSection(_Strict):
    """``run`` section."""

    output_dir: str

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty; give the run directory (e.g. runs/my_run)")
        return v


class RunConfig(BaseModel):
    """The validated run config. ``model`` is a :class:`llp_pretrain.models.ModelConfig` (the type is
    resolved by :func:`load_config`, which imports the models package).

    Derived fields (filled by :func:`load_config`): ``world_size``, ``data_parallel_size``,
    ``train.grad_accum_steps``, ``train.global_batch_size``, ``ds_config`` (the resolved DeepSpeed
    dict), ``source`` (the YAML path) and ``deepspeed`` (resolved absolute JSON path).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: ModelConfig
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
    without a leading ``configs/``). Raises ``IsADirectoryError`` when ``name`` is a directory (naming
    the YAML files in it) and ``FileNotFoundError`` listing the places tried."""
    p = Path(name).expanduser()
    tried = [p]
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.y*ml"))[:5]
        raise IsADirectoryError(f"config {name!r} is a directory, not a run YAML file; give the file"
                                + (f" (it holds: {', '.join(found)})" if found else ""))
    if os.path.lexists(p):  # a FIFO (never opened: it would block), a device, a symlink that does not resolve
        raise ValueError(f"config {name!r} is not a regular file (a FIFO, a device, or a symlink that does not "
                         "resolve); give the run YAML file")
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
    """Read and type-check ``DIR/manifest.json`` of a dataset directory with ``llp-prep``'s own reader
    (``data_prep.manifest.read_manifest``: one reader for both sides).

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` naming the file and key when it is
    not JSON, of another format version, or holds a value of the wrong type. ``path`` may be a URL
    prefix (``llp_pretrain.remote``): the manifest is fetched (``ShardFetchError``, an ``OSError``,
    when it cannot be) and checked by the same reader."""
    from data_prep.errors import DataPrepError
    from data_prep.manifest import read_manifest as read_checked
    from llp_pretrain.remote import is_url, read_url_manifest

    if is_url(str(path)):
        return read_url_manifest(str(path))
    m = Path(path) / "manifest.json"
    if not os.path.lexists(m):  # anything else that is not a regular file: the checked reader names it
        raise FileNotFoundError(f"{m}: no manifest.json; is {path} a dataset directory written by `llp-prep shard`?")
    try:
        return read_checked(path)
    except DataPrepError as e:
        raise ValueError(str(e)) from None


# --------------------------------------------------------------------------------------------
# YAML: strict loading (UTF-8, no duplicate keys) and line numbers

class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last one
    silently, so a repeated ``lr:`` would quietly override the first). Merge keys (``<<``) may still
    be overridden by explicit keys, as YAML specifies. With ``duplicates`` set to a list, every
    repeated key is recorded there as ``(line, message)`` instead of raising at the first."""

    duplicates: Optional[List[Tuple[int, str]]] = None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable (complex) key: the base class reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    what = f"duplicate key {key!r} (first given at line {first}); keep one of them"
                    if self.duplicates is not None:
                        self.duplicates.append((key_node.start_mark.line + 1, what))
                        continue
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            what, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: Path) -> Tuple[Any, str]:
    """Parse a YAML file strictly (UTF-8 text, no duplicate keys, no Python tags): ``(data, text)``.

    Raises :class:`ConfigError` naming the file and line (not UTF-8, not valid YAML, unreadable), or
    naming every duplicate key at once."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(str(path), [("<file>", f"cannot read it ({e.strerror or e})")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(str(path), [(f"line {line}", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                                       f"{e.start}); save the file as UTF-8")]) from None
    loader = UniqueKeyLoader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        what = getattr(e, "problem", None) or str(e)
        raise ConfigError(str(path), [(where, f"not valid YAML: {what}")]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(str(path), [(f"line {ln}", f"not valid YAML: {what}") for ln, what in loader.duplicates])
    return data, text

# --------------------------------------------------------------------------------------------
# YAML line numbers

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
    parsed, problems = _parse_overrides(items)
    if problems:
        raise ConfigError("--set", problems)
    return parsed


def _parse_overrides(items: List[str]) -> Tuple[List[Tuple[List[str], Any]], List[Tuple[str, str]]]:
    """``(parsed overrides, problems)``: the well-formed items and one problem per malformed one."""
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
            value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() != "" else ""
        except yaml.YAMLError as e:
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            problems.append((f"--set {item}", f"value is not valid YAML ({what}); quote it or fix it"))
            continue
        parsed.append((key.split("."), value))
    return parsed, problems


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
        elif e["type"] == "value_error":  # our validators' messages are whole sentences
            out.append((loc, str(e.get("ctx", {}).get("error", e["msg"]))))
        else:
            out.append((loc, f"{e['msg']} (got {e.get('input')!r})"))
    return out


def _model_config_cls():
    """``ModelConfig``, imported late (it brings torch; models may be absent in partial installs), and
    ``RunConfig.model`` typed with it."""
    from llp_pretrain.models import ModelConfig

    if not RunConfig.__pydantic_complete__:
        RunConfig.model_rebuild(_types_namespace={"ModelConfig": ModelConfig})
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
    directory) whose sha256 equals the manifest's tokenizer hash (any, without a manifest); for a
    dataset at a URL, then its own copy fetched from there (``remote.fetch_tokenizer``, checked by
    sha256, cached); None if there is none."""
    if data.tokenizer:
        return Path(data.tokenizer)
    from data_prep.tokenizer import file_sha256
    from llp_pretrain.remote import fetch_tokenizer, is_url

    base = Path(data.first_path)
    tok = (manifest or {}).get("tokenizer", {})
    url = is_url(data.first_path)
    cands = [] if url else [base / "tokenizer.model", base.parent / "tokenizer" / "tokenizer.model",
                            base.parent / "tokenizer.model"]
    if tok.get("path"):
        cands += [Path(tok["path"])] + ([] if url else [base / tok["path"]])
    want = tok.get("sha256")
    for cand in cands:
        if cand.is_file() and (want is None or file_sha256(cand) == want):
            return cand
    return fetch_tokenizer(data.path, manifest) if url else None


def _validate_section(name: str, cls, val: Dict[str, Any], problems: List[Tuple[str, str]],
                      placeholders: Optional[Dict[str, Any]] = None,
                      context: Optional[Dict[str, Any]] = None) -> Tuple[Any, set]:
    """Validate one section: ``(object, bad_fields)``.

    When fields are wrong, their problems are added and the section is validated again without
    them (defaults, or ``placeholders`` for required fields, stand in), so the section's own
    combination checks and the cross-field checks still run on the fields that are right: the
    object is then a *partial* one, for checks only, and ``bad_fields`` names what it lacks.
    A combination problem found on that second pass is reported unless it mentions a bad field
    (it may come from a stand-in). The object is None when even that is impossible. ``context`` is
    pydantic's validation context for the cross-field validators (``world_size``, ``layout``)."""
    try:
        return cls.model_validate(val, context=context), set()
    except ValidationError as e:
        problems.extend(_pydantic_problems(name, cls, e))
        bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
    except ValueError as e:  # configs may raise plain ValueErrors naming fields
        problems.append((name, str(e)))
        return None, set()
    if not bad:  # the combination check itself failed: nothing more to learn
        return None, bad
    keep = {k: v for k, v in val.items() if k not in bad}
    for k in bad:
        if k in (placeholders or {}):
            keep[k] = placeholders[k]
    if any(f not in keep and info.is_required() for f, info in cls.model_fields.items()):
        return None, bad
    try:
        return cls.model_validate(keep, context=context), bad
    except (ValidationError, ValueError) as e:
        errs = e.errors() if isinstance(e, ValidationError) else [{"loc": (), "msg": str(e)}]
        for err in errs:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not err["loc"] and not any(b in msg for b in bad):
                problems.append((name, msg))
        return None, bad


def _value(obj: Any, raw: Any, bad: set, name: str, typ=int) -> Any:
    """A field's value for cross-field checks: from the (possibly partial) section object, else the
    raw YAML value when it already has type ``typ``; None when the field is wrong or unknown."""
    if name in bad:
        return None
    if obj is not None:
        return getattr(obj, name, None)
    v = raw.get(name) if isinstance(raw, dict) else None
    return v if isinstance(v, typ) and not isinstance(v, bool) else None


def _resolve_world_size(world_size: Optional[int], problems: List[Tuple[str, str]]) -> Optional[int]:
    """The number of processes: ``world_size``, else ``$WORLD_SIZE``, else 1; None (with a problem)
    when it is not a positive integer."""
    if world_size is None:
        env = os.environ.get("WORLD_SIZE")
        if env is None:
            return 1
        try:
            world_size = int(env)
        except ValueError:
            problems.append(("WORLD_SIZE", f"the environment variable WORLD_SIZE={env!r} is not an integer; unset it "
                             "or set it to the number of processes (torchrun/srun set it for you)"))
            return None
        if world_size < 1:
            problems.append(("WORLD_SIZE", f"the environment variable WORLD_SIZE={env!r} must be >= 1; unset it or "
                             "set it to the number of processes"))
            return None
        return world_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        problems.append(("world_size", f"{world_size!r} must be a positive number of processes (--world-size N, N >= 1)"))
        return None
    return world_size


def output_dir_problem(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` cannot be (or become) a writable output directory (it is a file, lies under a
    file, or is not writable), or None."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a directory; choose a new directory path"
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    if q.exists() and not q.is_dir():
        return f"{p} cannot be created: {q} is a file; choose a directory path"
    if q.is_dir() and not os.access(q, os.W_OK | os.X_OK):
        return f"{p} cannot be written: no write permission in {q}; choose a writable directory"
    return None


def load_config(path: str | os.PathLike | None = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None, *, raw: Optional[Dict[str, Any]] = None,
                check_data: bool = True) -> RunConfig:
    """Load, override and validate a run config, reporting every problem in one round.

    Args:
        path: the run YAML (looked up with :func:`find_config_file`), or None with ``raw``.
        overrides: ``["train.lr=1e-3", ...]`` applied in order after the YAML.
        world_size: number of processes; default ``$WORLD_SIZE`` or 1.
        raw: an already-parsed config dict (instead of ``path``).
        check_data: read the manifest/tokenizer of ``data.path`` for the cross checks.

    Returns:
        a :class:`RunConfig` with the derived fields filled in.

    Raises:
        ConfigError: every problem found (malformed ``--set`` items, the YAML's own problems, wrong
            fields, cross-field rules, the DeepSpeed JSON), each with file, line and dotted key. A
            wrong field does not hide the checks of the fields next to it.
        FileNotFoundError: the YAML itself does not exist.
    """
    src = find_config_file(str(path)) if raw is None else None
    raw, overridden, lines, problems = _read_raw(src, overrides, raw)
    source, base_dir = (str(src), src.parent) if src is not None else ("<dict>", Path.cwd())

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
    world_size = _resolve_world_size(world_size, problems)
    secs, layout = _validate_sections(raw, world_size, problems)
    manifest = _check_data(secs, check_data, problems)
    model, model_bad = _check_model(raw.get("model"), secs, manifest, problems)
    secs["model"] = (model, model_bad, raw.get("model"))
    dp, batch = _check_layout_and_batch(secs, layout, manifest, problems)
    ds_resolved, ds_config = _check_deepspeed(raw.get("deepspeed"), base_dir, secs, batch, problems)

    if problems:
        raise ConfigError(source, [(where(loc), msg) for loc, msg in problems])
    train = secs["train"][0]
    train.grad_accum_steps, train.global_batch_size = batch["grad_accum_steps"], batch["global_batch_size"]
    if batch.get("virtual_readers"):
        secs["data"][0].virtual_readers = batch["virtual_readers"]
    return RunConfig(model=model, data=secs["data"][0], train=train, parallel=secs["parallel"][0],
                     deepspeed=str(ds_resolved), run=secs["run"][0], world_size=world_size,
                     data_parallel_size=dp, ds_config=ds_config, source=source, manifest=manifest)


def read_run_config(path: str | os.PathLike, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """The run YAML at ``path`` (looked up with :func:`find_config_file`) as a dict, ``--set``
    ``overrides`` applied: the same reading :func:`load_config` does, without the validation (the
    launchers read the layout settings with it). Raises :class:`ConfigError` (YAML or ``--set``
    problems, all of them), ``FileNotFoundError`` / ``IsADirectoryError`` (the path)."""
    src = find_config_file(str(path))
    raw, _, _, problems = _read_raw(src, overrides, None)
    if problems:
        raise ConfigError(str(src), problems)
    return raw


def _read_raw(src: Optional[Path], overrides: Optional[List[str]], raw: Optional[Dict[str, Any]]):
    """Parse the YAML at ``src`` (or copy ``raw``) and apply the well-formed ``overrides``:
    ``(tree, overridden dotted keys, YAML line map, problems of the malformed overrides)``.
    Raises :class:`ConfigError` when the file or its top level cannot be read as a mapping."""
    parsed, problems = _parse_overrides(list(overrides or []))
    lines: Dict[str, int] = {}
    if src is not None:
        try:
            raw, text = read_yaml_file(src)
        except ConfigError as e:
            raise ConfigError(e.source, e.problems + problems) from None
        lines = _line_map(text)
    else:
        raw = copy.deepcopy(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(src or "<dict>"), [("<top>", "the run config must be a mapping of sections")] + problems)
    overridden = set()
    for key_path, value in parsed:
        _apply_override(raw, key_path, value)
        overridden.add(".".join(key_path))
    return raw, overridden, lines, problems


def _validate_sections(raw: Dict[str, Any], world_size: Optional[int], problems):
    """``({name: (object or partial object or None, bad fields, raw value)}, layout)`` for
    data/parallel/train/run. ``parallel`` is validated first: with ``world_size`` it gives the run's
    :class:`ParallelLayout` (None when either is wrong), the context of ``train``'s batch rule."""
    out: Dict[str, Tuple[Any, set, Any]] = {}
    context: Dict[str, Any] = {"world_size": world_size, "layout": None}
    for name, cls in (("data", DataConfig), ("parallel", ParallelConfig), ("train", TrainConfig), ("run", RunSection)):
        val = raw.get(name, {} if name == "parallel" else None)
        if val is None:
            out[name] = (None, set(), None)
        elif not isinstance(val, dict):
            problems.append((name, f"must be a mapping, got {type(val).__name__}"))
            out[name] = (None, set(), None)
        else:
            obj, bad = _validate_section(name, cls, val, problems, context=context)
            out[name] = (obj, bad, val)
        if name == "parallel" and out[name][0] is not None and not out[name][1] and world_size is not None:
            context["layout"] = ParallelLayout(world_size, out[name][0].sequence_parallel_size)
    run, run_bad, run_raw = out["run"]
    out_dir = _value(run, run_raw, run_bad, "output_dir", str)
    if out_dir is not None:
        why = output_dir_problem(out_dir)
        if why:
            problems.append(("run.output_dir", why))
    return out, context["layout"]


def _check_data(secs, check_data: bool, problems) -> Optional[Dict[str, Any]]:
    """Read ``data.path``'s manifest, or each of ``data.sources`` (which must share the tokenizer and
    ``seq_len``), checked even when other data keys are wrong; the (first) manifest or None. The train
    shard counts go to ``secs["train_shards"]`` for the data-layout check."""
    data, bad, data_raw = secs["data"]
    data_path = _value(data, data_raw, bad, "path", str)
    manifest = None
    if data is not None and data.sources and check_data:
        manifest = _check_sources(data.sources, secs, problems)
    if data_path is not None and check_data:
        try:
            manifest = read_manifest(data_path)
            secs["train_shards"] = [_train_shards(manifest)]
        except (OSError, ValueError) as e:
            problems.append(("data.path", str(e)))
    if (data_path is not None or manifest is not None) and check_data:
        tok = _value(data, data_raw, bad, "tokenizer", str)
        if tok and not Path(tok).is_file():
            problems.append(("data.tokenizer", f"{tok}: no such file"
                             + ("" if not Path(tok).exists() else " (it is a directory; give the tokenizer.model file)")))
    return manifest


def _train_shards(manifest: Dict[str, Any]) -> int:
    return sum(1 for sh in manifest.get("shards", []) if sh.get("split") == "train")


def _check_sources(sources, secs, problems) -> Optional[Dict[str, Any]]:
    """The manifests of ``data.sources``: each readable, all with the first one's tokenizer sha256 and
    ``seq_len`` (a problem names the mismatch). Returns the first manifest, or None."""
    manifests = []
    for i, src in enumerate(sources):
        try:
            manifests.append((i, src, read_manifest(src.path)))
        except (FileNotFoundError, ValueError) as e:
            problems.append((f"data.sources.{i}.path", str(e)))
    if not manifests or manifests[0][0] != 0:
        return None
    _, first, m0 = manifests[0]
    for i, src, m in manifests[1:]:
        for what, get in (("tokenizer sha256", lambda m: m.get("tokenizer", {}).get("sha256")),
                          ("seq_len", lambda m: m.get("seq_len"))):
            if get(m) != get(m0):
                problems.append((f"data.sources.{i}.path", f"source {src.name!r} ({src.path}) has {what} {get(m)}, "
                                 f"source {first.name!r} ({first.path}) has {get(m0)}; all sources of a mixture "
                                 "must be sharded with one tokenizer and one --seq-len"))
    if len(manifests) == len(sources):
        secs["train_shards"] = [_train_shards(m) for _, _, m in manifests]
    return m0


def _check_model(model_raw: Any, secs, manifest, problems):
    """Validate ``model`` (partially when fields are wrong) and check it against the manifest."""
    if model_raw is None:
        return None, set()
    if not isinstance(model_raw, dict):
        problems.append(("model", f"must be a mapping, got {type(model_raw).__name__}"))
        return None, set()
    model_raw = dict(model_raw)
    piece_count = manifest.get("tokenizer", {}).get("piece_count") if manifest is not None else None
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
        return None, set()
    # vocab_size and n_layers take no part in the model's combination checks: safe stand-ins
    model, bad = _validate_section("model", mcls, model_raw, problems, placeholders={"vocab_size": 1 << 16,
                                                                                      "n_layers": 1})
    seq_len = _value(model, model_raw, bad, "seq_len")
    vocab = _value(model, model_raw, bad, "vocab_size")
    if manifest is not None and seq_len is not None and int(manifest.get("seq_len", -1)) != int(seq_len):
        data_path = secs["data"][0].first_path if secs["data"][0] is not None else None
        problems.append(("model.seq_len", f"{seq_len} differs from the shards' seq_len "
                         f"{manifest.get('seq_len')} ({Path(str(data_path)) / 'manifest.json'}); "
                         "re-shard with `llp-prep shard --seq-len` or change model.seq_len"))
    if piece_count is not None and vocab is not None and int(vocab) < int(piece_count):
        problems.append(("model.vocab_size", f"{vocab} is smaller than the tokenizer's piece count "
                         f"{piece_count}; use vocab_size: auto or >= {piece_count}"))
    return model, bad


def _check_layout_and_batch(secs, layout: Optional[ParallelLayout], manifest, problems):
    """The rules between sections (sequence parallelism needs an LLP model with whole segments per
    rank, the shards must feed the readers) and the derived batch fields (the batch rule itself is
    ``TrainConfig``'s validator). ``layout``: the run's layout, None when it is wrong or unknown.
    Returns ``(data_parallel_size or None, batch fields)``."""
    par_raw = secs["parallel"][2]
    model, model_bad, model_raw = secs["model"]
    dp = layout.dp_size if layout is not None else None
    sp = _value(None, par_raw, set(), "sequence_parallel_size")  # an int even when it does not fit the world size
    variant = _value(model, model_raw, model_bad, "variant", str)
    if sp is not None and sp > 1 and variant is not None and variant != "llp":
        problems.append(("parallel.sequence_parallel_size", f"{sp} > 1 needs model.variant: llp (got {variant!r})"))
    elif sp is not None and sp > 1 and model is not None and model.segment_len:
        if model.seq_len % (sp * model.segment_len) != 0:
            unit = sp * model.segment_len
            problems.append(("model.seq_len",
                             f"{model.seq_len} must be a multiple of sequence_parallel_size * segment_len = "
                             f"{sp} * {model.segment_len} = {unit} (each rank keeps whole segments); e.g. "
                             f"{max(unit, model.seq_len // unit * unit)}"))
    train, train_bad, train_raw = secs["train"]
    mb, ga, gb = (_value(train, train_raw, train_bad, k)
                  for k in ("micro_batch_size", "grad_accum_steps", "global_batch_size"))
    batch = {"micro_batch_size": mb, "grad_accum_steps": None, "global_batch_size": None}
    wrong = {"grad_accum_steps", "global_batch_size"} & train_bad  # reported already (types or the rule)
    if mb is not None and layout is not None and not wrong and all(v is None or v > 0 for v in (mb, ga, gb)):
        try:
            ga, gb = layout.batch(mb, ga, gb)
            batch.update(grad_accum_steps=ga, global_batch_size=gb)
        except LayoutError as e:  # TrainConfig's validator checks it; here only when the section is partial
            problems.append(("train.global_batch_size", str(e)))
    data, data_bad, data_raw = secs["data"]
    readers = _value(data, data_raw, data_bad, "virtual_readers")
    counts = secs.get("train_shards")
    if counts and dp is not None and batch["global_batch_size"] and "virtual_readers" not in data_bad:
        from llp_pretrain.data_order import data_layout_problem, resolve_virtual_readers

        why = data_layout_problem(batch["global_batch_size"], counts, dp, readers)
        if why:
            problems.append(("data.virtual_readers" if readers else "train.global_batch_size", why))
        else:
            batch["virtual_readers"] = resolve_virtual_readers(batch["global_batch_size"], counts, readers)
    return dp, batch


#: DeepSpeed config sections whose value must be a JSON object
DS_OBJECT_SECTIONS = ("fp16", "bf16", "amp", "zero_optimization", "optimizer", "scheduler",
                      "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
                      "comms_logger", "aio", "checkpoint", "data_types", "data_efficiency", "compression_training",
                      "autotuning", "elasticity", "pipeline", "nebula", "communication_data_type_config")


def _check_deepspeed(ds_path: Any, base_dir: Path, secs, batch, problems) -> Tuple[Optional[Path], Dict[str, Any]]:
    """Read the DeepSpeed JSON, check its shape, and fill/check it against the YAML's values."""
    if ds_path is None:
        return None, {}
    if not isinstance(ds_path, str):
        problems.append(("deepspeed", "must be the path of a DeepSpeed JSON file"))
        return None, {}
    try:
        ds_resolved = find_config_file(ds_path, base_dir)
    except FileNotFoundError as e:
        problems.append(("deepspeed", str(e)))
        return None, {}
    try:
        ds_config = json.loads(ds_resolved.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        problems.append(("deepspeed", f"{ds_resolved}: not UTF-8 text (offset {e.start}); save it as UTF-8"))
        return ds_resolved, {}
    except json.JSONDecodeError as e:
        problems.append(("deepspeed", f"{ds_resolved}: line {e.lineno}: not valid JSON ({e.msg})"))
        return ds_resolved, {}
    except OSError as e:
        problems.append(("deepspeed", f"{ds_resolved}: cannot read it ({e.strerror or e})"))
        return ds_resolved, {}
    if not isinstance(ds_config, dict):
        problems.append(("deepspeed", f"{ds_resolved}: the top level must be a JSON object {{...}}, got "
                         f"{_json_type(ds_config)}"))
        return ds_resolved, {}
    problems.extend(_ds_shape_problems(ds_config, str(ds_resolved)))
    train, train_bad, _ = secs["train"]
    known = {"train_batch_size": batch["global_batch_size"], "train_micro_batch_size_per_gpu": batch["micro_batch_size"],
             "gradient_accumulation_steps": batch["grad_accum_steps"]}
    if train is not None and "grad_clip" not in train_bad:
        known["gradient_clipping"] = float(train.grad_clip)
    prec = resolved_precision(train) if train is not None and "precision" not in train_bad else None
    ds_config, ds_problems = _resolve_ds_config(ds_config, known, prec, str(ds_resolved))
    problems.extend(ds_problems)
    return ds_resolved, ds_config


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _ds_shape_problems(ds: Dict[str, Any], where: str) -> List[Tuple[str, str]]:
    """Sections that must be JSON objects and are not; a ZeRO stage that is not 0-3."""
    out = []
    for key in DS_OBJECT_SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            out.append((f"deepspeed:{key}", f"{where}: \"{key}\" must be a JSON object (e.g. {{\"enabled\": ...}}), "
                        f"got {_json_type(ds[key])} {json.dumps(ds[key])}; fix the JSON"))
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        st = zero["stage"]
        if isinstance(st, bool) or not isinstance(st, int) or not 0 <= st <= 3:
            out.append(("deepspeed:zero_optimization.stage", f"{where}: stage {json.dumps(st)} must be 0, 1, 2 or 3"))
    if isinstance(zero, dict):
        out += _zero_section_problems(zero, where)
    return out


def _zero_section_problems(zero: Dict[str, Any], where: str) -> List[Tuple[str, str]]:
    """``zero_optimization`` checked by DeepSpeed's own config model (types, nested offload objects,
    unknown keys), so that what passes here also passes ``deepspeed.initialize``."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # pragma: no cover - deepspeed is a dependency; train would fail loudly anyway
        return []
    try:
        DeepSpeedZeroConfig(**zero)
        return []
    except ValidationError as e:
        errors = e.errors()
    except (TypeError, ValueError) as e:
        return [("deepspeed:zero_optimization", f"{where}: {e}")]
    out = []
    for err in errors:
        if tuple(err["loc"][:1]) == ("stage",):
            continue  # reported above
        key = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(err["loc"][-1], DeepSpeedZeroConfig.model_fields)
        else:
            msg = f"{err['msg']} (got {json.dumps(err.get('input'), default=str)})"
        out.append((f"deepspeed:zero_optimization.{key}", f"{where}: {msg}; fix the JSON"))
    return out


def resolved_precision(train: TrainConfig) -> str:
    """``fp32`` or ``bf16``: ``auto`` means bf16 when CUDA is available, else fp32."""
    if train.precision != "auto":
        return train.precision
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def _resolve_ds_config(ds: Dict[str, Any], known: Dict[str, Any], prec: Optional[str], where: str):
    """Fill/check the DeepSpeed JSON against the YAML. ``known`` maps DeepSpeed batch/clip
    keys to the YAML's values (None: unknown because the YAML value is wrong, not checked); ``prec`` is
    the resolved precision or None. Returns (resolved dict, problems)."""
    ds = copy.deepcopy(ds)
    problems = []
    for key, value in known.items():
        have = ds.get(key, "auto")
        if value is not None and have != "auto" and have != value:
            problems.append((f"deepspeed:{key}", f"{where} says {have} but the run config gives {value}; "
                             "remove it from the JSON (or set it to \"auto\"): the YAML is the source of truth"))
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append((f"deepspeed:{key}", f"{where} has a '{key}' section; the optimizer (AdamW) and the "
                             "warmup+cosine schedule are set in the YAML `train` section, remove it"))
    fp16 = ds.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") is True:
        problems.append(("deepspeed:fp16", f"{where} enables fp16; use train.precision: bf16 or fp32"))
    bf16 = ds.get("bf16") if isinstance(ds.get("bf16"), dict) else {}  # another shape was reported already
    if prec is not None and bf16.get("enabled", "auto") not in ("auto", prec == "bf16"):
        problems.append(("deepspeed:bf16.enabled", f"{where} says {bf16.get('enabled')} but train.precision "
                         f"resolves to {prec}; set it to \"auto\" or remove it"))
    ds["bf16"] = {**bf16, "enabled": prec == "bf16"}
    ds.pop("fp16", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds, problems


def dump_yaml(data: Dict[str, Any], path: Path) -> None:
    """Write ``data`` as YAML atomically (``data_prep.atomic.write_atomic``: temporary name, then rename)."""
    from data_prep.atomic import write_atomic

    text = yaml.safe_dump(data, sort_keys=False)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
