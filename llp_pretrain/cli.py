"""``llp-pretrain``: train, eval, generate, export, quickstart (see ``docs/training.md``).

Exit status: 0 on success (also after a SIGTERM/SIGUSR1 checkpoint-and-stop), 2 for configuration
or usage errors (message on stderr), 1 for other failures.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "build_parser"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default; options without one say so (``default: none``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0 and isinstance(action.default, bool):  # a flag
            return text + (" (default: on)" if action.default else " (default: off)")
        if action.required:
            return text + " (required)"
        if action.default is None or action.default == []:
            return text + " (default: none)"
        return text + " (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"llp-pretrain {v('llp-pretrain')} (torch {v('torch')}, deepspeed {v('deepspeed')})"


def _at_least(kind: type, low, high=None):
    """argparse ``type=``: a value of ``kind`` (``int`` or ``float``; a float must be finite) that is
    ``>= low`` (and ``<= high`` when given); anything else is refused with a message naming the value."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} must be {'a finite number ' if kind is float else ''}>= {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return value

    parse.__name__ = f"{'integer' if kind is int else 'number'} >= {low}"
    return parse


def _add_eval_and_generate(add) -> None:
    """The ``eval`` and ``generate`` sub-commands (``add(name, help)`` makes a sub-parser)."""
    p = add("eval", "strided sliding-window perplexity of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir or exported dir")
    p.add_argument("--data", required=True, help="dataset directory (manifest.json + shards) or URL prefix "
                   "(http(s)://..., file://..., pipe:CMD with {name}; see docs/training.md)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="split written by `llp-prep shard`")
    p.add_argument("--stride", type=_at_least(int, 1), default=None, metavar="TOKENS",
                   help="window advance in tokens (default: the model's trained positions per window / 2)")
    p.add_argument("--batch-size", type=_at_least(int, 1), default=8, metavar="N", help="windows per forward pass")
    p.add_argument("--max-samples", type=_at_least(int, 1), default=None, metavar="N",
                   help="use only the first N samples of the split (default: all)")
    p.add_argument("--json", action="store_true", help="print only the result, as one JSON object")

    p = add("generate", "sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir or exported dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_at_least(int, 0), default=100, metavar="N", help="tokens to generate")
    p.add_argument("--temperature", type=_at_least(float, 0.0), default=0.8,
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=_at_least(int, 1), default=None, metavar="K",
                   help="sample from the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=_at_least(int, 0, 2**63 - 1), default=None,
                   help="sampling seed for a reproducible sample (default: random)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model file (default: the one saved with the run or the export)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llp-pretrain", description="Pretrain LLP language models with DeepSpeed.",
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    # the `deepspeed` launcher passes --local_rank=N before the sub-command (LOCAL_RANK is used)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    p = add("train", "train (or resume) a run described by a YAML config")
    p.add_argument("--config", required=True, help="run YAML (e.g. configs/quickstart.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run, if any) or a checkpoint path "
                   "(default: a new run; refused where the run directory already holds checkpoints)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds checkpoints (deletes its checkpoints/ and "
                        "tensorboard/); without it such a directory needs --resume")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank_sub", type=int, default=None,
                   help=argparse.SUPPRESS)  # deepspeed launcher, when given after the sub-command

    p = add("check-config", "validate a run config and print the resolved values")
    p.add_argument("--config", required=True, help="run YAML to check")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for train (repeatable)")
    p.add_argument("--world-size", type=_at_least(int, 1), default=None, metavar="N",
                   help="number of processes to check the layout for (default: $WORLD_SIZE, else 1)")

    _add_eval_and_generate(add)

    p = add("export", "consolidated safetensors weights + model config (also from ZeRO-3)")
    p.add_argument("checkpoint", help="run dir, checkpoints dir or stepNNNNNNNN tag dir")
    p.add_argument("out", help="directory to write (created; an existing file is refused)")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                   help="safetensors: weights + model_config.json; hf: a transformers directory")
    p.add_argument("--max-shard-size", default="5GB", help="--format hf: shard model.safetensors above this size")
    from llp_pretrain.hf.harness import add_parser as add_harness_parser

    add_harness_parser(add)

    p = add("quickstart", "tokenizer + shards + training + eval + sample on the bundled corpus")
    p.add_argument("--out", default="runs/quickstart", help="directory for data/ and run/")
    p.add_argument("--steps", type=_at_least(int, 1), default=None, metavar="N",
                   help="train exactly N steps (smoke tests) (default: the fixed quickstart plan: the "
                   "same steps, so the same result, on every machine)")

    p = add("compare", "train several variants side by side; results table and plots")
    p.add_argument("--config", required=True, help="compare YAML (e.g. configs/compare/kjv_tiny.yaml)")
    p.add_argument("--variants", default=None, help="comma-separated subset, e.g. llp,perceiver_ar,gpt "
                   "(default: the YAML's list)")
    p.add_argument("--steps", type=_at_least(int, 1), default=None, metavar="N",
                   help="training steps per variant (default: the YAML's)")
    p.add_argument("--out", default=None, help="run directory (default: the YAML's run.output_dir)")
    return ap


def _cmd_train(args) -> int:
    from llp_pretrain.config import load_config
    from llp_pretrain.training import train
    from llp_pretrain.training.distributed import destroy_process_group

    cfg = load_config(args.config, args.overrides)
    try:
        res = train(cfg, resume=args.resume, overwrite=args.overwrite)
    finally:  # the last step of every exit path: the trainer has already shut down its parts
        destroy_process_group()
    return 0 if res.stopped_by in ("max_steps", "signal", "time_limit") else 1


def _cmd_check(args, out) -> int:
    import yaml

    from llp_pretrain.config import load_config

    cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    print(yaml.safe_dump({**cfg.to_dict(), "data_parallel_size": cfg.data_parallel_size,
                          "deepspeed_resolved": cfg.ds_config}, sort_keys=False), file=out)
    return 0


def _check_same_tokenizer(checkpoint: str, data: str, manifest) -> None:
    """Refuse data tokenized with another tokenizer than the checkpoint's (sha256 of tokenizer.model).

    Raises ``ValueError`` naming both hashes; warns on stderr when either side records none."""
    from llp_pretrain.export import tokenizer_hashes

    have = tokenizer_hashes(checkpoint)
    want = (manifest.get("tokenizer") or {}).get("sha256") if isinstance(manifest.get("tokenizer"), dict) else None
    if not have or not want:
        print(f"llp-pretrain: warning: cannot check that {data} was tokenized with the checkpoint's tokenizer "
              f"({'the checkpoint records no tokenizer hash' if not have else 'the manifest records no tokenizer sha256'})",
              file=sys.stderr, flush=True)
        return
    if want not in have:
        raise ValueError(f"{data}/manifest.json: the shards were tokenized with tokenizer sha256 "
                         f"{want[:12]}..., but {checkpoint} was trained with {sorted(have)[0][:12]}...; evaluate on "
                         "shards made with the checkpoint's tokenizer (`llp-prep shard --tokenizer RUN/tokenizer.model`)")


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "val", stride: Optional[int] = None,
                        batch_size: int = 8, max_samples: Optional[int] = None):
    """Strided evaluation of a checkpoint on a split; returns an :class:`EvalResult`.

    Raises ``ValueError`` before any scoring when the data's tokenizer (sha256) or ``seq_len`` is not
    the checkpoint's, or a token id is outside the model's vocabulary."""
    import torch

    from llp_pretrain.config import read_manifest
    from llp_pretrain.data import read_split_stream
    from llp_pretrain.evaluate import bytes_per_token, score_windows, summarize, window_plan
    from llp_pretrain.export import load_model

    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1")
    manifest = read_manifest(data)
    _check_same_tokenizer(checkpoint, data, manifest)
    model, mcfg, _ = load_model(checkpoint)
    n = int(mcfg["seq_len"])
    if int(manifest["seq_len"]) != n:
        raise ValueError(f"{data}/manifest.json has seq_len {manifest['seq_len']}, the model {n}; evaluate on shards "
                         f"made with `llp-prep shard --seq-len {n}`")
    sl = model.trained_positions(n)
    tlen = sl.stop - sl.start
    stride = stride if stride is not None else max(1, tlen // 2)
    stream = read_split_stream(data, split, manifest, max_samples=max_samples)
    if len(stream) and int(stream.max()) >= int(mcfg["vocab_size"]):
        raise ValueError(f"{data}: split {split!r} holds token id {int(stream.max())} >= the model's vocab_size "
                         f"{mcfg['vocab_size']}; it was tokenized with another tokenizer")
    plan = window_plan(len(stream), n, stride, tlen)
    nll, count = score_windows(lambda x: model(x), torch.from_numpy(stream), plan, n, tlen, batch_size)
    return summarize(nll, count, bytes_per_token(manifest, split))


def _cmd_eval(args, out) -> int:
    res = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.stride, args.batch_size, args.max_samples)
    if args.json:
        print(json.dumps(res.to_dict()), file=out)
    else:
        bpb = f"{res.bits_per_byte:.4f}" if res.bits_per_byte is not None else "n/a"
        print(f"{args.split}: tokens {res.tokens} | loss {res.loss:.4f} | perplexity {res.ppl:.3f} | bits/byte {bpb}",
              file=out)
    return 0


def load_tokenizer(path, checkpoint: Optional[str] = None):
    """A SentencePiece processor from a ``tokenizer.model`` file.

    Raises ``FileNotFoundError``/``ValueError`` naming ``path`` when it is missing, a directory, not a
    SentencePiece model, or (with ``checkpoint``) not the tokenizer that checkpoint was trained with."""
    import sentencepiece as spm

    from data_prep.tokenizer import file_sha256
    from llp_pretrain.export import tokenizer_hashes

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"tokenizer {p} is a directory; give the tokenizer.model file inside it")
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer {p}: no such file; give the run's tokenizer.model")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(p))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"tokenizer {p} is not a SentencePiece model ({str(e).strip().splitlines()[-1]}); give the "
                         "tokenizer.model written by `llp-prep tokenizer`") from None
    have = tokenizer_hashes(checkpoint) if checkpoint is not None else None
    if have and file_sha256(p) not in have:
        raise ValueError(f"tokenizer {p} (sha256 {file_sha256(p)[:12]}...) is not the one {checkpoint} was trained "
                         f"with ({sorted(have)[0][:12]}...); leave out --tokenizer to use the run's own")
    return sp


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                  tokenizer: Optional[str] = None) -> str:
    """Prompt + continuation decoded with the run's SentencePiece tokenizer (or ``tokenizer``, which
    must be the same file by sha256)."""
    import torch

    from llp_pretrain.export import load_model

    sp = load_tokenizer(tokenizer, checkpoint) if tokenizer is not None else None
    model, _, tok = load_model(checkpoint)
    if sp is None:
        if tok is None:
            raise FileNotFoundError(f"no tokenizer.model found with {checkpoint}; pass --tokenizer")
        sp = load_tokenizer(tok)
    ids = sp.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    from llp_pretrain.special_ids import generation_ids

    eos_id, pad_id = generation_ids(sp)
    out = model.generate(torch.tensor(ids), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=eos_id, pad_id=pad_id, seed=seed)
    return sp.decode(out.tolist())


def _cmd_generate(args, out) -> int:
    print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.seed, args.tokenizer), file=out)
    return 0


def _cmd_export(args, out) -> int:
    from llp_pretrain.export import export_checkpoint

    if args.format == "hf":
        from llp_pretrain.hf.export import export_hf

        print(f"wrote {export_hf(args.checkpoint, args.out, args.max_shard_size)} (transformers, trust_remote_code)",
              file=out)
        return 0
    d = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {d / 'model.safetensors'} and {d / 'model_config.json'}", file=out)
    return 0


def _cmd_quickstart(args) -> int:
    from llp_pretrain.quickstart import run_quickstart

    try:
        run_quickstart(args.out, steps=args.steps, require_margin=args.steps is None)
    except RuntimeError as e:  # the trained model does not beat the unigram baseline by the required margin
        print(f"llp-pretrain quickstart: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_compare(args) -> int:
    from llp_pretrain.compare import run_compare

    variants = None
    if args.variants is not None:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not variants:
            raise ValueError("--variants is empty; name one or more of gpt, perceiver_ar, history_self_attention, "
                             "compressed_history, segmented_history, llp (or leave it out for the config's list)")
    run_compare(args.config, out=args.out, variants=variants, steps=args.steps)
    return 0


def quiet_other_ranks() -> None:
    """Start-up notices once, not once per rank: on global ranks other than 0 (``$RANK``), standard
    output (the console is rank 0's; libraries print start-up notices there), DeepSpeed's log lines
    below ERROR, Python warnings and torch's C++ warnings are dropped. Errors still reach stderr from
    every rank. Runs before torch and deepspeed are imported."""
    if os.environ.get("RANK", "0").strip() in ("", "0"):
        return
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    import logging
    import warnings

    class _ErrorsOnly(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno >= logging.ERROR

    logging.getLogger("DeepSpeed").addFilter(_ErrorsOnly())  # the logger deepspeed.utils.logger uses
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


#: commands whose stdout is their result (JSON, text, YAML): library chatter goes to stderr meanwhile
RESULT_COMMANDS = ("check-config", "eval", "generate", "export")
#: user errors: one line, exit status 2
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def _os_error_line(e: OSError) -> str:
    """One line for an operating-system error: the path, what happened and what to do."""
    where = e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        if e.strerror and e.strerror.startswith("no space left"):  # raised by our code with a whole message
            return e.strerror
        return (str(e) if str(e).startswith("no space left")  # checkpoint.DiskFullError: the whole message
                else f"no space left on the device holding {where or 'the output'}; free space and rerun")
    if e.strerror is None:  # raised by our code with a whole message
        return str(e)
    hint = {errno.ENOTDIR: "a part of this path is a file; choose another path",
            errno.EEXIST: "it exists; choose another path",
            errno.EISDIR: "it is a directory; give a file",
            errno.EACCES: "no permission; choose a writable path or fix the permissions",
            errno.EPERM: "no permission; choose a writable path or fix the permissions",
            errno.EROFS: "the file system is read-only; choose another path"}.get(e.errno)
    line = f"{where}: {e.strerror}" if where else e.strerror
    return f"{line}; {hint}" if hint else line


def _out_of_memory_line(e: BaseException) -> Optional[str]:
    """One line for an allocation that failed (host or accelerator memory), None for other errors."""
    text = str(e).strip()
    oom = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in text or "out of memory" in text.lower()
    if not oom:
        return None
    m = re.search(r"tried to allocate ([0-9.]+ ?[A-Za-z]*)", text)
    what = f" (an allocation of {m.group(1)} failed)" if m else ""
    return (f"out of memory{what}; make the model smaller (model.d_model, model.n_layers), lower "
            "train.micro_batch_size or model.seq_len, or spread it over more processes (ZeRO-3)")


def _cmd_harness(args) -> int:
    from llp_pretrain.hf.harness import main as harness_main

    return harness_main(args)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``llp-pretrain`` console script.

    Exit status 2 with one line on stderr for user errors (bad config, bad paths, bad values), 1 with
    one line for a full disk or another operating-system error, 0 on success."""
    from llp_pretrain.config import ConfigError

    args = build_parser().parse_args(argv)
    if args.command == "train":
        quiet_other_ranks()
    handlers = {"train": _cmd_train, "check-config": _cmd_check, "eval": _cmd_eval, "generate": _cmd_generate,
                "export": _cmd_export, "quickstart": _cmd_quickstart,
                "compare": _cmd_compare, "harness": _cmd_harness}
    try:
        from data_prep.errors import DataPrepError
    except ImportError:  # pragma: no cover - data_prep ships with llp_pretrain
        DataPrepError = ConfigError  # noqa: N806
    try:
        if args.command in RESULT_COMMANDS:
            out = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                return handlers[args.command](args, out)
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"llp-pretrain: {e}", file=sys.stderr)
        return 2
    except (DataPrepError, *USER_ERRORS) as e:
        msg = _os_error_line(e) if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else str(e)
        print(f"llp-pretrain {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, an I/O error: not the user's input, but no traceback either
        print(f"llp-pretrain {args.command}: error: {_os_error_line(e)}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"llp-pretrain {args.command}: error: {_out_of_memory_line(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from llp_pretrain.engine import DistributedInitError
        from llp_pretrain.training.distributed import peer_failure_line

        line = str(e) if isinstance(e, DistributedInitError) else peer_failure_line(e) or _out_of_memory_line(e)
        if line is None:
            raise
        print(f"llp-pretrain {args.command}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
