"""``llp-prep``: tokenizer | shard | merge | verify | stats (see ``docs/data_prep.md``).

Exit status: 0 success, 1 ``verify`` found problems, 2 bad input or settings (the message names
the file, line, key or value and says what to do).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import List, Optional

from .errors import DataPrepError, os_error_message
from .inputs import DEFAULT_MAX_LINE_BYTES, DOC_SEPS, ERRORS, FORMATS, ReadOptions


FEW_SHARDS = 32     # fewer train shards than this: say how to get more


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (``--help`` of every subcommand shows them);
    required options and flags that default to off say so instead."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or "(default:" in h or action.default is argparse.SUPPRESS \
                or not action.option_strings:
            return h
        if action.required:
            return h + " (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return h + " (default: off)"
        if action.default is None:
            return h + " (default: none)"
        return h + " (default: %(default)s)"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llp-pretrain")
    except Exception:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                   help="files or directories (recursive, sorted): plain text, JSON Lines or "
                        "Parquet; text and JSONL may be gzip/xz/zstd/bz2 compressed")
    p.add_argument("--doc-sep", choices=DOC_SEPS, default="file",
                   help="plain text: one document per file, or documents separated by blank "
                        "lines")
    p.add_argument("--merge-short", type=int, default=0, metavar="CHARS",
                   help="with --doc-sep blank-line: join a paragraph shorter than CHARS characters "
                        "to the next one (e.g. chapter titles to their chapters); 0: never")
    p.add_argument("--format", dest="input_format", choices=FORMATS, default="auto",
                   help="auto: *.parquet is Parquet, *.jsonl/*.ndjson/*.json[.gz|.xz|.zst|.bz2] "
                        "JSON Lines, the rest text")
    p.add_argument("--text-key", default="text",
                   help="JSON Lines field / Parquet column holding the text")
    p.add_argument("--errors", choices=ERRORS, default="replace",
                   help="invalid UTF-8 and lone surrogates: replace with U+FFFD, skip them, or "
                        "fail; replace/skip are counted")
    p.add_argument("--strict", action="store_true",
                   help="JSON Lines / Parquet: fail on the first bad record (file:line or "
                        "file:row) instead of counting it")
    p.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES, metavar="BYTES",
                   help="JSON Lines: longer lines are skipped and counted")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _read_options(a) -> ReadOptions:
    return ReadOptions(doc_sep=a.doc_sep, text_key=a.text_key, errors=a.errors, strict=a.strict,
                       max_line_bytes=a.max_line_bytes, input_format=a.input_format,
                       merge_short=a.merge_short)


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: the manifest records argv, and "--work 2" would slip past the filter of
    # execution-only options
    ap = argparse.ArgumentParser(prog="llp-prep", allow_abbrev=False, formatter_class=_HelpFormatter,
                                 description="Corpora -> SentencePiece tokenizer -> WebDataset "
                                             "token shards with a verifiable manifest.")
    ap.add_argument("--version", action="version", version=f"llp-prep {_version()}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True)
    kw = {"allow_abbrev": False, "formatter_class": _HelpFormatter}

    t = sub.add_parser("tokenizer", **kw, help="train DIR/tokenizer.{model,vocab,json}")
    _add_input_args(t)
    t.add_argument("--vocab-size", type=int, default=32000,
                   help="pieces, the 4 specials and 256 byte pieces included")
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="SentencePiece model type")
    t.add_argument("--normalization", choices=("identity", "nfkc"), default="identity",
                   help="identity (lossless) or nfkc")
    t.add_argument("--max-sentences", type=int, default=1_000_000,
                   help="train on a deterministic sample of this many chunks")
    t.add_argument("--max-sentence-bytes", type=int, default=4192,
                   help="training chunks are cut at newlines to at most this many bytes")
    t.add_argument("--character-coverage", type=float, default=0.9995,
                   help="SentencePiece character coverage, in [0.98, 1] (rarer characters use byte "
                        "pieces)")
    t.add_argument("--soft-vocab-limit", action="store_true",
                   help="accept fewer pieces than --vocab-size when the corpus is too small")
    t.add_argument("--seed", type=int, default=0, help="seed of the training-chunk sample")
    t.add_argument("--threads", type=int, default=None,
                   help="SentencePiece trainer threads (none: the CPU count, at most 16)")
    t.add_argument("--out", required=True, metavar="DIR", help="directory for the tokenizer files")

    s = sub.add_parser("shard", **kw,
                       help="tokenize and write DIR/{train,val}-NNNNNN.tar + manifest.json")
    _add_input_args(s)
    s.add_argument("--tokenizer", required=True, metavar="MODEL",
                   help="a SentencePiece model file (or the directory holding tokenizer.model)")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset directory")
    s.add_argument("--seq-len", type=int, default=2048,
                   help="model context; samples hold seq_len + 1 tokens")
    s.add_argument("--val-fraction", type=float, default=0.005,
                   help="expected fraction of documents in the val split")
    s.add_argument("--split-seed", type=int, default=0, help="salt of the train/val split hash")
    s.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="samples per tar (the last shard of a split may hold fewer)")
    s.add_argument("--workers", type=int, default=1,
                   help="encoding processes (0: encode in the main process); the main process "
                        "reads, packs and writes meanwhile. The output is identical for any value")
    s.add_argument("--parallel", choices=("processes", "threads"), default="processes",
                   help="worker kind: processes or threads (SentencePiece releases the GIL; less "
                        "CPU per token). The output is identical either way")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a different dataset already in --out")
    s.add_argument("--num-tasks", type=int, default=None, metavar="N",
                   help="array job: the inputs are split by whole files into N size-balanced "
                        "parts; this run makes part --task-index in OUT/parts/I (then `llp-prep "
                        "merge OUT`) (default: $SLURM_ARRAY_TASK_COUNT if set, else no array)")
    s.add_argument("--task-index", type=int, default=None, metavar="I",
                   help="array job: which part, 0..N-1 (default: $SLURM_ARRAY_TASK_ID if set)")

    mg = sub.add_parser("merge", **kw,
                        help="merge the parts of an array job (OUT/parts/*) into one dataset")
    mg.add_argument("dir", help="the --out of the array job")
    mg.add_argument("--keep-parts", action="store_true",
                    help="keep OUT/parts after merging (the shards are hard links)")
    mg.add_argument("--overwrite", action="store_true",
                    help="replace a different finished dataset already in DIR")

    v = sub.add_parser("verify", **kw, help="re-hash and decode every shard, check the manifest")
    v.add_argument("dir", help="dataset directory (holding manifest.json)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    st = sub.add_parser("stats", **kw,
                        help="documents, tokens, bytes per token, unk/byte-fallback rates")
    st.add_argument("dir", help="dataset directory (holding manifest.json)")
    st.add_argument("--json", action="store_true", help="print JSON")
    return ap


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DataPrepError(f"${name}={v!r} is not an integer; unset it or pass --num-tasks and "
                            f"--task-index") from None


def _array_args(a):
    """``(num_tasks, task_index)`` from the options, else from a SLURM array's environment."""
    n = a.num_tasks if a.num_tasks is not None else _env_int("SLURM_ARRAY_TASK_COUNT")
    i = a.task_index if a.task_index is not None else _env_int("SLURM_ARRAY_TASK_ID")
    if n is None and i is None:
        return None, None
    if n is None or i is None:
        raise DataPrepError(f"array job: --num-tasks {n} and --task-index {i}: give both (in a "
                            f"SLURM array they default to $SLURM_ARRAY_TASK_COUNT and "
                            f"$SLURM_ARRAY_TASK_ID)")
    return n, i


def _with_array(argv: List[str], num_tasks: Optional[int]) -> List[str]:
    """The recorded command line names --num-tasks even when it came from the environment."""
    if num_tasks is None or any(x == "--num-tasks" or x.startswith("--num-tasks=") for x in argv):
        return argv
    return argv + ["--num-tasks", str(num_tasks)]


def _cmd_tokenizer(a, argv: List[str]) -> int:
    from .tokenizer import train_tokenizer

    info = train_tokenizer(
        a.input, a.out, vocab_size=a.vocab_size, model_type=a.model_type,
        normalization=a.normalization, max_sentences=a.max_sentences,
        max_sentence_bytes=a.max_sentence_bytes, character_coverage=a.character_coverage,
        soft_vocab_limit=a.soft_vocab_limit, seed=a.seed, num_threads=a.threads,
        read_options=_read_options(a), quiet=a.quiet, argv=argv)
    print(f"wrote {a.out}/tokenizer.model ({info['piece_count']} pieces, sha256 "
          f"{info['sha256'][:16]}...) from {info['sampling']['documents']:,} documents, "
          f"{info['sampling']['sentences_used']:,} of "
          f"{info['sampling']['sentences_seen']:,} training chunks")
    print("skipped:")
    print("\n".join(info["skip_summary"]))
    return 0


def _cmd_shard(a, argv: List[str]) -> int:
    from .shards import build_shards

    num_tasks, task_index = _array_args(a)
    m = build_shards(
        a.input, a.tokenizer, a.out, seq_len=a.seq_len, val_fraction=a.val_fraction,
        samples_per_shard=a.samples_per_shard, workers=a.workers,
        read_options=_read_options(a), split_seed=a.split_seed, overwrite=a.overwrite,
        quiet=a.quiet, parallel=a.parallel, argv=_with_array(argv, num_tasks),
        num_tasks=num_tasks, task_index=task_index)
    if m.get("kind") == "part":
        t = m["totals"]
        print(f"task {m['task_index']} of {m['num_tasks']}: {t['train']['documents']:,} "
              f"train + {t['val']['documents']:,} val documents -> "
              f"{t['train']['samples']:,} train samples; wrote "
              f"{a.out}/parts/{m['task_index']}/manifest.json")
        return 0
    for s, t in m["totals"].items():
        print(f"{s}: {t['documents']:,} documents, {t['text_tokens']:,} tokens -> "
              f"{t['samples']:,} samples in {t['shards']} shards "
              f"({t['dropped_tail_tokens']:,} tail tokens dropped)")
    print(f"wrote {a.out}/manifest.json")
    n_train, samples = m["totals"]["train"]["shards"], m["totals"]["train"]["samples"]
    if n_train < FEW_SHARDS:
        more = (f": lower --samples-per-shard (now {a.samples_per_shard}) for a small corpus"
                if samples > n_train else ": this corpus holds too few samples for more")
        print(f"note: {n_train} train shard(s); training needs at least data_parallel_size x "
              f"data.num_workers of them (`llp-pretrain check-config` checks){more}")
    print("skipped:")
    print("\n".join(m["skip_summary"]))
    return 0


def _cmd_merge(a, argv: List[str]) -> int:
    from .array import merge_parts

    m = merge_parts(a.dir, keep_parts=a.keep_parts, overwrite=a.overwrite)
    for s, t in m["totals"].items():
        print(f"{s}: {t['documents']:,} documents, {t['samples']:,} samples in "
              f"{t['shards']} shards")
    print(f"wrote {a.dir}/manifest.json ({m['array']['num_tasks']} parts merged)")
    return 0


def _cmd_verify(a, argv: List[str]) -> int:
    from .verify import verify_dataset

    r = verify_dataset(a.dir)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        for w in r["warnings"]:
            print(f"warning: {w}")
        for e in r["errors"]:
            print(f"ERROR: {e}")
        print(f"{'OK' if r['ok'] else 'FAILED'}: {r['shards']} shards, {r['samples']:,} "
              f"samples, {r['tokens']:,} tokens checked in {a.dir}")
    return 0 if r["ok"] else 1


def _cmd_stats(a, argv: List[str]) -> int:
    from .stats import dataset_stats, format_stats

    st = dataset_stats(a.dir)
    print(json.dumps(st, indent=1) if a.json else "\n".join(format_stats(st)))
    return 0


COMMANDS = {"tokenizer": _cmd_tokenizer, "shard": _cmd_shard, "merge": _cmd_merge,
            "verify": _cmd_verify, "stats": _cmd_stats}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``llp-prep``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a, argv)
    except DataPrepError as e:
        print(f"llp-prep {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `llp-prep ... | head`: the reader left; quiet, like other tools
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:   # a full disk, a permission, ...: one line, no traceback
        print(f"llp-prep {a.cmd}: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llp-prep {a.cmd}: interrupted; rerun the same command to redo it cleanly",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
