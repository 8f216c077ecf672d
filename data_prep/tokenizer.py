"""Training the SentencePiece tokenizer (``llp-prep tokenizer``).

Settings follow ``docs/internals.md``: fixed ids pad=0 unk=1 bos=2 eos=3, byte fallback on (so no
text ever maps to ``unk``), whitespace and newlines kept (no dummy prefix, no whitespace removal),
identity normalization by default (``nfkc`` as an option, which is not lossless). Training sentences
are documents cut at newlines into chunks of at most ``max_sentence_bytes`` UTF-8 bytes (a line
longer than that is cut at a character boundary), so a long document is chunked, never dropped, and
the newline character gets its own pieces. A reservoir sample of ``max_sentences`` chunks
(seeded, deterministic) is what SentencePiece trains on.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from .errors import DataPrepError, SkipCounter, check_utf8_name, os_error_message
from .inputs import ReadOptions, discover, iter_documents
from .manifest import ensure_dir, write_json_atomic
from .progress import Progress

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
MODEL_TYPES = ("bpe", "unigram")
NORMALIZATIONS = ("identity", "nfkc")
TOKENIZER_FORMAT_VERSION = 1


def file_sha256(path: os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def split_for_training(text: str, max_bytes: int) -> Iterator[str]:
    """Cut ``text`` into chunks of at most ``max_bytes`` UTF-8 bytes, at newlines where possible.

    Newlines stay inside the chunks (so SentencePiece learns pieces containing ``\\n``); a single
    line longer than ``max_bytes`` is cut at character boundaries. Nothing is dropped: the chunks
    concatenate back to ``text``.
    """
    if len(text.encode("utf-8")) <= max_bytes:
        if text:
            yield text
        return
    cur: List[str] = []
    cur_bytes = 0
    for line in text.splitlines(keepends=True):
        nb = len(line.encode("utf-8"))
        if cur and cur_bytes + nb > max_bytes:
            yield "".join(cur)
            cur, cur_bytes = [], 0
        if nb > max_bytes:
            # a line longer than the limit: cut by characters (<= 4 bytes each)
            pos = 0
            while pos < len(line):
                step = max(1, max_bytes // 4)
                end = min(len(line), pos + step)
                # grow greedily while it fits
                while end < len(line) and len(line[pos:end + step].encode("utf-8")) <= max_bytes:
                    end = min(len(line), end + step)
                yield line[pos:end]
                pos = end
            continue
        cur.append(line)
        cur_bytes += nb
    if cur:
        yield "".join(cur)


def _sample_sentences(sources, opts: ReadOptions, skips: SkipCounter, max_sentences: int,
                      max_sentence_bytes: int, seed: int, progress: Progress) -> (List[str], Dict):
    """Reservoir-sample training chunks; returns them in corpus order plus counts."""
    rng = random.Random(seed)
    reservoir: List[tuple] = []
    seen = 0
    n_docs = 0
    doc_parts: List[str] = []
    for _, _, piece, last in iter_documents(sources, opts, skips, progress.add_bytes):
        doc_parts.append(piece)
        if not last:
            # pieces of a long document: emit all complete chunks but the tail, keep the tail
            joined = "".join(doc_parts)
            cut = joined.rfind("\n") + 1
            if cut <= 0:
                if len(joined) < max_sentence_bytes:
                    continue
                cut = len(joined)  # one very long line: chunk it by characters
            head, tail = joined[:cut], joined[cut:]
            doc_parts = [tail] if tail else []
            chunks = split_for_training(head, max_sentence_bytes)
        else:
            n_docs += 1
            progress.add_docs(1)
            chunks = split_for_training("".join(doc_parts), max_sentence_bytes)
            doc_parts = []
        for ch in chunks:
            if seen < max_sentences:
                reservoir.append((seen, ch))
            else:
                j = rng.randrange(seen + 1)
                if j < max_sentences:
                    reservoir[j] = (seen, ch)
            seen += 1
    reservoir.sort(key=lambda x: x[0])
    return [s for _, s in reservoir], {"documents": n_docs, "sentences_seen": seen,
                                        "sentences_used": len(reservoir)}


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_FEW_CHARS = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
# SentencePiece's own option names, as they appear in its messages, and ours (``llp-prep tokenizer``)
_SPM_OPTIONS = {"character_coverage": "--character-coverage", "vocab_size": "--vocab-size",
                "num_threads": "--threads", "max_sentence_length": "--max-sentence-bytes",
                "model_type": "--model-type", "normalization_rule_name": "--normalization",
                "input_sentence_size": "--max-sentences", "hard_vocab_limit": "--soft-vocab-limit",
                "split_digits": "--split-digits"}
# ranges SentencePiece's trainer accepts (its VerifySpec), checked first so that no message of
# its own (with its option names) reaches the user
CHARACTER_COVERAGE_RANGE = (0.98, 1.0)
MAX_THREADS = 128
MAX_SENTENCE_BYTES = 1 << 30
MAX_VOCAB_SIZE = (1 << 31) - 1
MAX_SEED = (1 << 32) - 2
MIN_VOCAB_SIZE = 4 + 256 + 1


def spm_message(text: str) -> str:
    """SentencePiece's message ``text`` in our terms: its option names (``--character_coverage``,
    ``vocab_size``, ...) become ``llp-prep tokenizer``'s (``--character-coverage``, ...)."""
    text = re.sub(r" with --(\w+) option", "", text.strip())
    for theirs, ours in _SPM_OPTIONS.items():
        text = re.sub(rf"(?<![\w.])(?:--)?{theirs}(?:\(\))?(?!\w)", ours, text)
    return text


def check_tokenizer_settings(vocab_size: int, model_type: str, normalization: str,
                             max_sentences: int, max_sentence_bytes: int,
                             character_coverage: float, seed: int,
                             num_threads: Optional[int]) -> None:
    """Raise ``DataPrepError`` naming the first ``llp-prep tokenizer`` option out of range."""
    if model_type not in MODEL_TYPES:
        raise DataPrepError(f"--model-type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
    if normalization not in NORMALIZATIONS:
        raise DataPrepError(f"--normalization {normalization!r}: choose one of "
                            f"{', '.join(NORMALIZATIONS)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataPrepError(f"--vocab-size {vocab_size} is too small: the 4 special pieces and the "
                            f"256 byte-fallback pieces need {MIN_VOCAB_SIZE - 1}; use at least "
                            f"{MIN_VOCAB_SIZE} (1000+ for real text)")
    checks = [
        ("--vocab-size", vocab_size, MIN_VOCAB_SIZE, MAX_VOCAB_SIZE),
        ("--max-sentences", max_sentences, 1, None),
        ("--max-sentence-bytes", max_sentence_bytes, 16, MAX_SENTENCE_BYTES),
        ("--character-coverage", character_coverage, *CHARACTER_COVERAGE_RANGE),
        ("--seed", seed, 0, MAX_SEED),
        ("--threads", num_threads, 1, MAX_THREADS),
    ]
    for flag, value, lo, hi in checks:
        if value is None:
            continue
        if not (value >= lo and (hi is None or value <= hi)):   # also refuses NaN
            span = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise DataPrepError(f"{flag} {value} is out of range: it must be {span}")


def _read_training_text(inputs, opts: ReadOptions, max_sentences: int, max_sentence_bytes: int,
                        seed: int, quiet: bool):
    """Step 1: the deterministic sample of training chunks; ``(sentences, counts, skips)``."""
    skips = SkipCounter()
    sources = discover(inputs, opts.input_format, skips)
    progress = Progress(total_bytes=sum(s.size for s in sources), desc="tokenizer: reading",
                        quiet=quiet)
    try:
        sentences, counts = _sample_sentences(sources, opts, skips, max_sentences,
                                              max_sentence_bytes, seed, progress)
    finally:
        progress.close()
    if not sentences:
        raise DataPrepError(f"no text to train on in {', '.join(map(str, inputs))} "
                            f"(skips: {skips.as_dict()})")
    return sentences, counts, skips


def _spm_settings(vocab_size, model_type, normalization, split_digits, character_coverage,
                  max_sentence_bytes, soft_vocab_limit) -> Dict:
    """Step 2: SentencePiece's trainer options (recorded in ``tokenizer.json``)."""
    return dict(
        vocab_size=vocab_size, model_type=model_type, normalization_rule_name=normalization,
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=split_digits,
        character_coverage=character_coverage, max_sentence_length=max_sentence_bytes,
        hard_vocab_limit=not soft_vocab_limit, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        eos_id=EOS_ID, pad_piece=SPECIAL_PIECES["pad"], unk_piece=SPECIAL_PIECES["unk"],
        bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"],
    )


def _run_trainer(sentences: List[str], prefix: str, settings: Dict, threads: int, seed: int,
                 counts: Dict, out: Path) -> None:
    """Step 3: SentencePiece trains and writes ``prefix.{model,vocab}``; its errors become one line
    in our terms."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed + 1)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=prefix,
                                       num_threads=threads, minloglevel=2, **settings)
    except (RuntimeError, ValueError, TypeError) as e:
        vocab_size, coverage = settings["vocab_size"], settings["character_coverage"]
        m = _TOO_HIGH.search(str(e))
        if m:
            raise DataPrepError(
                f"--vocab-size {vocab_size} is more than this corpus supports "
                f"({counts['sentences_used']} training chunks give at most {m.group(2)} "
                f"pieces): use --vocab-size {m.group(2)} or less, add text, or pass "
                f"--soft-vocab-limit to accept fewer pieces") from None
        m = _TOO_FEW_CHARS.search(str(e))
        if m:
            raise DataPrepError(
                f"--vocab-size {vocab_size} is too small for this corpus: the characters that "
                f"cover --character-coverage {coverage} of its text need {m.group(2)} pieces "
                f"(specials included); use --vocab-size {m.group(2)} or more, or a lower "
                f"--character-coverage (>= {CHARACTER_COVERAGE_RANGE[0]}: rarer characters then "
                f"use byte pieces)") from None
        _check_space(out, "the tokenizer")
        raise DataPrepError(f"SentencePiece training failed: {spm_message(str(e))}") from None


def _check_space(out: Path, what: str) -> None:
    """Raise the "no space left" ``DataPrepError`` for ``out`` when its device is (nearly) full:
    SentencePiece does not report failed writes, it leaves truncated files."""
    try:
        st = os.statvfs(out)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < _NEARLY_FULL:
        raise DataPrepError(f"no space left on the device holding {out} while writing {what} "
                            f"({free} bytes free); free space or choose another --out, then rerun "
                            f"the same command (nothing was written to {out})")


_NEARLY_FULL = 64 << 10    # bytes; what a failed write leaves free is far less


def _check_written(sp_module, prefix: str, out: Path):
    """Step 4: the model SentencePiece wrote loads, has our special ids, and its vocab file lists
    every piece (SentencePiece ignores write errors: on a full disk it leaves truncated files).
    Returns the loaded processor."""
    model, vocab = Path(prefix + ".model"), Path(prefix + ".vocab")
    try:
        sp = sp_module.SentencePieceProcessor(model_file=str(model))
    except (RuntimeError, OSError) as e:
        _check_space(out, "tokenizer.model")
        raise DataPrepError(f"{out / 'tokenizer.model'}: SentencePiece wrote a model that does not "
                            f"load ({spm_message(str(e))}); check the device holding {out} and "
                            f"rerun the same command (nothing was written to {out})") from None
    _check_ids(sp, out / "tokenizer.model")
    want = sum(1 + sp.id_to_piece(i).count("\n") for i in range(sp.get_piece_size()))
    data = vocab.read_bytes() if vocab.is_file() else b""
    got = data.count(b"\n")
    if got != want or not data.endswith(b"\n"):
        _check_space(out, "tokenizer.vocab")
        raise DataPrepError(f"{out / 'tokenizer.vocab'}: SentencePiece wrote {got} of {want} lines "
                            f"(a truncated file); check the device holding {out} and rerun the "
                            f"same command (nothing was written to {out})")
    return sp


TMP_PREFIX = ".tokenizer-tmp-"


def remove_stale_temps(out: Path, prefix: str) -> None:
    """Remove ``out/PREFIX<pid>-*`` directories whose process is gone (a killed run's temporaries;
    a running one's are kept)."""
    for d in out.glob(f"{prefix}*"):
        pid = d.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: Path, out: Path, info: Dict) -> None:
    """Step 6: ``tokenizer.json`` next to the model in ``tmp``, then all three renamed into ``out``
    (``tokenizer.json`` last: it records the model's sha256)."""
    try:
        write_json_atomic(tmp / "tokenizer.json", info, indent=2)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataPrepError(f"no space left on the device holding {out} while writing "
                                f"{out / 'tokenizer.json'}; free space or choose another --out, "
                                f"then rerun the same command (nothing was written to {out})"
                                ) from None
        raise
    for name in ("tokenizer.model", "tokenizer.vocab", "tokenizer.json"):
        os.replace(tmp / name, out / name)


def train_tokenizer(inputs: Sequence[str], out_dir: os.PathLike, *, vocab_size: int = 32000,
                    model_type: str = "bpe", normalization: str = "identity",
                    max_sentences: int = 1_000_000, max_sentence_bytes: int = 4192,
                    character_coverage: float = 0.9995, soft_vocab_limit: bool = False,
                    split_digits: bool = True, seed: int = 0, num_threads: Optional[int] = None,
                    read_options: Optional[ReadOptions] = None, quiet: bool = True,
                    argv: Optional[List[str]] = None) -> Dict:
    """Train a SentencePiece model on ``inputs`` and write ``out_dir/tokenizer.{model,vocab,json}``.

    Args:
        inputs: files or directories (see ``data_prep.inputs.discover``).
        vocab_size: requested number of pieces, specials and the 256 byte pieces included.
        model_type: ``bpe`` or ``unigram``.
        normalization: ``identity`` (lossless, default) or ``nfkc``.
        max_sentences: size of the deterministic reservoir sample of training chunks.
        max_sentence_bytes: training chunk limit in UTF-8 bytes (SentencePiece's sentence limit).
        character_coverage: in [0.98, 1]; rarer characters use byte pieces.
        soft_vocab_limit: if the corpus cannot support ``vocab_size`` pieces, make fewer instead of
            failing (the real count is recorded as ``piece_count``).
        read_options: how documents are read (doc separator, JSONL key, --errors, ...).

    All three files are written in a temporary directory inside ``out_dir``, checked (the model
    loads, the vocab is complete) and then renamed into place, so a failure (a full disk) leaves
    nothing half-written.

    Returns:
        The dict written to ``tokenizer.json`` (settings, ``piece_count``, ``sha256``, ids).

    Raises:
        DataPrepError: bad settings, no usable text, a vocabulary the corpus cannot support
            (the message gives the size that works), or a full disk (names the directory).
    """
    import sentencepiece as spm

    opts = read_options or ReadOptions()
    opts.validate()
    check_tokenizer_settings(vocab_size, model_type, normalization, max_sentences,
                             max_sentence_bytes, character_coverage, seed, num_threads)
    out = ensure_dir(out_dir)
    sentences, counts, skips = _read_training_text(inputs, opts, max_sentences,
                                                   max_sentence_bytes, seed, quiet)
    settings = _spm_settings(vocab_size, model_type, normalization, split_digits,
                             character_coverage, max_sentence_bytes, soft_vocab_limit)
    threads = num_threads or min(os.cpu_count() or 1, 16)
    remove_stale_temps(out, TMP_PREFIX)
    with tempfile.TemporaryDirectory(dir=out, prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp_dir:
        tmp = Path(tmp_dir)
        prefix = str(tmp / "tokenizer")
        _run_trainer(sentences, prefix, settings, threads, seed, counts, out)
        sp = _check_written(spm, prefix, out)
        byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
        info = {
            "format_version": TOKENIZER_FORMAT_VERSION,
            "model": "tokenizer.model",
            "sha256": file_sha256(tmp / "tokenizer.model"),
            "piece_count": int(sp.get_piece_size()),
            "requested_vocab_size": vocab_size,
            "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
            "byte_fallback_ids": [min(byte_ids), max(byte_ids)] if byte_ids else None,
            "settings": settings,
            "sampling": {"max_sentences": max_sentences, "max_sentence_bytes": max_sentence_bytes,
                         "seed": seed, **counts},
            "read_options": _opts_dict(opts),
            "inputs": [str(p) for p in inputs],
            "skipped": skips.as_dict(),
            "argv": argv,
        }
        _install(tmp, out, info)
    info["skip_summary"] = skips.summary_lines()
    return info


def _opts_dict(opts: ReadOptions) -> Dict:
    return {"doc_sep": opts.doc_sep, "text_key": opts.text_key, "errors": opts.errors,
            "strict": opts.strict, "max_line_bytes": opts.max_line_bytes,
            "input_format": opts.input_format, "merge_short": opts.merge_short}


def _check_ids(sp, path) -> None:
    want = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
    for i, piece in want.items():
        if sp.id_to_piece(i) != piece:
            raise DataPrepError(f"{path}: id {i} is {sp.id_to_piece(i)!r}, expected {piece!r}")


def special_ids(sp) -> Dict[str, int]:
    """The model's own ``pad_id``, ``unk_id``, ``bos_id``, ``eos_id`` (-1: not defined).

    Models from ``llp-prep tokenizer`` have 0, 1, 2, 3; other SentencePiece models (a Llama-2
    style ``tokenizer.model``: unk 0, bos 1, eos 2, no pad) keep theirs, and the manifest records
    them so nothing downstream has to assume 0-3."""
    return {"pad_id": int(sp.pad_id()), "unk_id": int(sp.unk_id()), "bos_id": int(sp.bos_id()),
            "eos_id": int(sp.eos_id())}


def model_file(path: os.PathLike) -> Path:
    """``path`` itself, or ``path/tokenizer.model`` when ``path`` is a directory."""
    p = Path(path)
    return p / "tokenizer.model" if p.is_dir() else p


def load_tokenizer(model_path: os.PathLike):
    """Load a SentencePiece model (a file, or a directory holding ``tokenizer.model``).

    Any SentencePiece model works as long as it defines an EOS piece (appended after every
    document); its special ids are read with :func:`special_ids`.

    Returns:
        ``(processor, sha256, piece_count)``.

    Raises:
        DataPrepError: missing or unreadable file, not a SentencePiece model, or no EOS piece.
    """
    import sentencepiece as spm

    p = model_file(model_path)
    check_utf8_name(p, "--tokenizer")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataPrepError(f"tokenizer {str(model_path)!r} not found (train one with "
                            f"`llp-prep tokenizer`, or give a SentencePiece .model file)") from None
    except OSError as e:   # a symbolic link loop, a permission
        raise DataPrepError(f"tokenizer {str(model_path)!r} cannot be read ({e.strerror}); give a "
                            f"SentencePiece .model file") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataPrepError(f"tokenizer {str(model_path)!r} is not a regular file (a FIFO or device "
                            f"is not read); give a SentencePiece .model file")
    try:
        sha = file_sha256(p)
        sp = spm.SentencePieceProcessor(model_file=str(p))
    except OSError as e:
        raise DataPrepError(os_error_message(e, "reading the tokenizer")) from e
    except Exception as e:  # sentencepiece raises RuntimeError on a file that is not a model
        raise DataPrepError(f"{p}: not a SentencePiece model ({e}); give a .model file") from e
    if sp.eos_id() < 0:
        raise DataPrepError(f"{p}: the model defines no EOS piece (eos_id -1), which llp-prep "
                            f"appends after every document; use a model with one")
    return sp, sha, int(sp.get_piece_size())
