"""Reading corpora: file discovery, decompression, binary detection, UTF-8 decoding and streaming
of documents in bounded pieces.

Documents are yielded as ``(source_index, ordinal, piece, last)``: a document longer than
``2 * PIECE_CHARS`` characters arrives as several pieces (cut just before/after a newline when
there is one), so memory stays bounded however large a file, a line or a document is. Cut points
depend only on the text, never on I/O block sizes, so the output is deterministic.
"""
from __future__ import annotations

import codecs
import errno
import gzip
import bz2
import json
import lzma
import os
import re
import stat
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import DataPrepError, SkipCounter, check_utf8_name, printable

BLOCK_BYTES = 1 << 20          # bytes read from disk (after decompression) at a time
PIECE_CHARS = 1 << 20          # documents longer than 2*PIECE_CHARS characters are streamed in pieces
SNIFF_BYTES = 8192             # binary detection looks at this many leading (decompressed) bytes
DEFAULT_MAX_LINE_BYTES = 64 << 20

FORMATS = ("auto", "text", "jsonl", "parquet")
DOC_SEPS = ("file", "blank-line")
ERRORS = ("replace", "skip", "fail")

_COMPRESSED_EXTS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
_JSONL_EXTS = {".jsonl", ".ndjson", ".json"}
_PARQUET_EXTS = {".parquet", ".pq"}

ProgressFn = Optional[Callable[[int], None]]


@dataclass(frozen=True)
class Source:
    """One input file.

    ``identity`` is the stable name used for the train/val split: the path relative to the
    directory given on the command line, or the file name for a file given directly. Moving a
    corpus directory therefore does not change which documents are validation documents.
    """

    path: str
    identity: str
    fmt: str          # "text" | "jsonl"
    size: int         # bytes on disk


@dataclass(frozen=True)
class ReadOptions:
    """How documents are cut out of the files (see ``docs/data_prep.md``)."""

    doc_sep: str = "file"            # "file": one document per text file; "blank-line": paragraphs
    text_key: str = "text"           # JSONL field holding the document text
    errors: str = "replace"          # invalid UTF-8: "replace" (U+FFFD), "skip" (drop bytes), "fail"
    strict: bool = False             # JSONL: fail (file:line) instead of counting bad lines
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    input_format: str = "auto"       # "auto" (by extension) | "text" | "jsonl" | "parquet"
    merge_short: int = 0             # blank-line mode: join paragraphs shorter than this many
                                     # characters to the next one (e.g. a title to its chapter)

    def validate(self) -> None:
        if self.merge_short < 0:
            raise DataPrepError(f"--merge-short must be >= 0, got {self.merge_short}")
        if self.merge_short and self.doc_sep != "blank-line":
            raise DataPrepError("--merge-short only applies with --doc-sep blank-line")
        if self.doc_sep not in DOC_SEPS:
            raise DataPrepError(f"--doc-sep {self.doc_sep!r}: choose one of {', '.join(DOC_SEPS)}")
        if self.errors not in ERRORS:
            raise DataPrepError(f"--errors {self.errors!r}: choose one of {', '.join(ERRORS)}")
        if self.input_format not in FORMATS:
            raise DataPrepError(f"--format {self.input_format!r}: choose one of {', '.join(FORMATS)}")
        if self.max_line_bytes < 1:
            raise DataPrepError(f"--max-line-bytes must be positive, got {self.max_line_bytes}")
        if not self.text_key:
            raise DataPrepError("--text-key must not be empty")


def warn(msg: str) -> None:
    """Print a warning line to stderr (progress bars stay on their own line)."""
    print(f"llp-prep: warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- discovery
def _format_of(path: Path, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _PARQUET_EXTS:
        return "parquet"
    while suffixes and suffixes[-1] in _COMPRESSED_EXTS:
        suffixes.pop()
    return "jsonl" if suffixes and suffixes[-1] in _JSONL_EXTS else "text"


def _walk_dir(top: Path, input_format: str, skips: Optional[SkipCounter]) -> List[Source]:
    """Sources under directory ``top``: recursive, sorted by relative path, hidden names skipped.

    Directory links are followed once (a link back to a directory already walked is counted as
    ``directory_loops``); an unreadable sub-directory, a dangling link and a FIFO / socket /
    device file are warned about and counted, never skipped silently.
    """
    def note(kind: str, path: str, why: str) -> None:
        warn(f"{printable(path)}: {why}; skipped (counted as {kind})")
        if skips is not None:
            skips.add(kind, where=printable(path))

    def onerror(e: OSError) -> None:
        if Path(e.filename) == top:
            raise DataPrepError(f"input directory {printable(top)} cannot be read "
                                f"({e.strerror}); fix its permissions or leave it out of --input")
        note("unreadable_directories", e.filename, f"directory cannot be read ({e.strerror})")

    found = []
    seen_dirs = set()
    for root, dirs, files in os.walk(top, onerror=onerror, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen_dirs:
            note("directory_loops", root, "leads back to a directory already walked")
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            dp = os.path.join(root, d)
            if not os.path.exists(dp):
                note("dangling_links", dp, "link to a directory that does not exist")
                dirs.remove(d)
        for f in files:
            if f.startswith("."):
                continue
            fp = Path(root) / f
            found.append((fp.relative_to(top).as_posix(), fp))
    found.sort()
    sources = []
    for rel, fp in found:
        try:
            st = fp.stat()
        except FileNotFoundError:
            note("dangling_links", str(fp), "link to a file that does not exist")
            continue
        except OSError as e:
            raise DataPrepError(f"input {printable(fp)} cannot be read ({e.strerror}); "
                                f"{_fix_hint(e)}") from e
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                note("special_files", str(fp), "not a regular file (FIFO, socket or device)")
            continue
        sources.append(_source(fp, rel, input_format, st.st_size))
    return sources


def _fix_hint(e: OSError) -> str:
    """What to do about an input that cannot be read."""
    if e.errno == errno.ELOOP:
        return "fix the symbolic link loop or leave it out of --input"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "fix its permissions or leave it out of --input"
    return "fix it or leave it out of --input"


def _source(fp: Path, identity: str, input_format: str, size: int) -> Source:
    check_utf8_name(fp)
    if not os.access(fp, os.R_OK):
        raise DataPrepError(f"input {fp} cannot be read (permission denied); fix its permissions "
                            f"or leave it out of --input")
    return Source(str(fp), identity, _format_of(fp, input_format), size)


def discover(inputs: Sequence[str], input_format: str = "auto",
             skips: Optional[SkipCounter] = None) -> List[Source]:
    """Expand ``inputs`` (files or directories) into a deterministic list of sources.

    Directories are walked recursively (see ``_walk_dir``); files are sorted by their relative
    path; hidden files and directories (names starting with ``.``) are ignored. Inputs keep the
    order they were given in. Unreadable sub-directories, dangling links and special files found
    while walking are warned about and counted in ``skips``.

    Raises:
        DataPrepError: an input does not exist or cannot be read, a name is not valid UTF-8, an
            input given directly is not a regular file, or nothing readable was found.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources: List[Source] = []
    for given in inputs:
        check_utf8_name(given)
        p = Path(given)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DataPrepError(f"input {str(given)!r} does not exist (give files or directories)")
        except OSError as e:
            raise DataPrepError(f"input {given} cannot be read ({e.strerror}); "
                                f"{_fix_hint(e)}") from e
        if stat.S_ISDIR(st.st_mode):
            sources.extend(_walk_dir(p, input_format, skips))
        elif stat.S_ISREG(st.st_mode):
            sources.append(_source(p, p.name, input_format, st.st_size))
        else:
            raise DataPrepError(f"input {given} is not a regular file or directory (a FIFO, "
                                f"socket or device); give files or directories")
    if not sources:
        raise DataPrepError(f"no input files found under {', '.join(map(str, inputs))}")
    return sources


# ----------------------------------------------------------------------------- bytes
def _sniff_compression(head: bytes) -> Optional[str]:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh"):
        return "bz2"
    return None


def _zstd_blocks(raw, path: str) -> Iterator[bytes]:
    # zstandard's stream_reader returns a short read, not an error, on a truncated frame; the
    # decompressobj's ``eof`` tells us whether the last frame was complete.
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending = False
    while True:
        chunk = raw.read(BLOCK_BYTES)
        if not chunk:
            break
        while chunk:
            out = dobj.decompress(chunk)
            pending = not dobj.eof
            if out:
                yield out
            if dobj.eof:
                chunk = dobj.unused_data
                dobj = dctx.decompressobj()
                pending = False
            else:
                chunk = b""
    if pending:
        raise EOFError("zstd frame ended before its end marker")


def iter_byte_blocks(path: str, progress: ProgressFn = None) -> Iterator[bytes]:
    """Yield the decompressed bytes of ``path`` in blocks of about ``BLOCK_BYTES``.

    Compression (gzip, xz, zstd, bz2) is detected from the magic bytes. ``progress(n)`` is called
    with the number of on-disk bytes consumed.

    Raises:
        DataPrepError: the compressed stream is truncated or corrupt (names the file).
    """
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataPrepError(f"input {printable(path)} cannot be read ({e.strerror}); "
                            f"{_fix_hint(e)}") from e
    with raw:
        kind = _sniff_compression(raw.read(6))
        raw.seek(0)
        done = 0

        def report():
            nonlocal done
            if progress is not None:
                pos = raw.tell()
                progress(pos - done)
                done = pos

        try:
            if kind == "zstd":
                for b in _zstd_blocks(raw, path):
                    report()
                    yield b
            else:
                if kind == "gzip":
                    stream = gzip.GzipFile(fileobj=raw, mode="rb")
                elif kind == "xz":
                    stream = lzma.LZMAFile(raw, mode="rb")
                elif kind == "bz2":
                    stream = bz2.BZ2File(raw, mode="rb")
                else:
                    stream = raw
                while True:
                    b = stream.read(BLOCK_BYTES)
                    if not b:
                        break
                    report()
                    yield b
            report()
        except (EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as e:
            if isinstance(e, OSError) and kind is None:
                raise DataPrepError(f"{path}: read error: {e}") from e
            msg = str(e) or type(e).__name__
            raise DataPrepError(
                f"{path}: the {kind} stream is truncated or corrupt ({msg}); re-create or "
                f"re-download the file, or leave it out of --input") from e
        except Exception as e:  # zstandard.ZstdError and friends
            if type(e).__name__ == "ZstdError":
                raise DataPrepError(
                    f"{path}: the zstd stream is corrupt ({e}); re-create or re-download the file, "
                    f"or leave it out of --input") from e
            raise


def looks_binary(head: bytes) -> bool:
    """True if the leading bytes of a (decompressed) file hold a NUL byte: UTF-8 text never does."""
    return b"\x00" in head[:SNIFF_BYTES]


# ----------------------------------------------------------------------------- UTF-8
_INVALID = [0]


def _count_replace(e):
    _INVALID[0] += 1
    return ("\ufffd", e.end)


def _count_skip(e):
    _INVALID[0] += 1
    return ("", e.end)


codecs.register_error("llp_prep_replace", _count_replace)
codecs.register_error("llp_prep_skip", _count_skip)
_HANDLERS = {"replace": "llp_prep_replace", "skip": "llp_prep_skip", "fail": "strict"}


def _iter_text_blocks(src: Source, opts: ReadOptions, skips: SkipCounter,
                      progress: ProgressFn) -> Iterator[str]:
    blocks = iter_byte_blocks(src.path, progress)
    first = next(blocks, b"")
    if looks_binary(first):
        warn(f"{src.path}: looks binary (NUL bytes in the first {SNIFF_BYTES} bytes); skipped")
        skips.add("binary_files", where=src.path)
        for _ in blocks:  # drain so the progress bar stays right
            pass
        return
    dec = codecs.getincrementaldecoder("utf-8-sig")(_HANDLERS[opts.errors])
    before = _INVALID[0]
    offset, line = 0, 1

    def chunks():
        yield first
        yield from blocks

    for b in chunks():
        try:
            t = dec.decode(b)
        except UnicodeDecodeError as e:
            at_line = line + b[:max(e.start, 0)].count(b"\n")
            raise DataPrepError(
                f"{src.path}: line {at_line}, byte {offset + e.start}: "
                f"invalid UTF-8 ({e.reason}); fix the file, or pass --errors replace (the default) "
                f"or --errors skip") from e
        offset += len(b)
        line += b.count(b"\n")
        if t:
            yield t
    try:
        t = dec.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{src.path}: ends inside a UTF-8 sequence ({e.reason}); fix the file, "
                            f"or pass --errors replace or --errors skip") from e
    if t:
        yield t
    n_bad = _INVALID[0] - before
    if n_bad:
        skips.add("invalid_utf8_sequences", n_bad, where=src.path)
        skips.add("files_with_invalid_utf8", 1, where=src.path)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_unicode(text: str, errors: str, skips: SkipCounter, where: str) -> str:
    """``text`` without lone surrogates (JSON ``"\\ud800"`` escapes decode to them; they are not
    Unicode and cannot be encoded): replaced with U+FFFD or dropped per ``errors`` and counted as
    ``invalid_unicode``; ``errors="fail"`` raises ``DataPrepError`` naming ``where``."""
    if text.isascii():
        return text
    n = len(_SURROGATE.findall(text))
    if not n:
        return text
    if errors == "fail":
        m = _SURROGATE.search(text)
        raise DataPrepError(f"{where}: text holds a lone surrogate U+{ord(m.group()):04X} at "
                            f"character {m.start()} (not valid Unicode); fix the record, or pass "
                            f"--errors replace (the default) or --errors skip")
    skips.add("invalid_unicode", n, where=where)
    return _SURROGATE.sub("\ufffd" if errors == "replace" else "", text)


# ----------------------------------------------------------------------------- documents
def _cut(buf: str, pos: int, before_newline: bool) -> int:
    """Cut point for the next piece of a long document: the first newline in
    ``[pos + PIECE_CHARS, pos + 2 * PIECE_CHARS)`` (before it in blank-line mode, so a separator
    stays whole; after it otherwise), else ``pos + 2 * PIECE_CHARS``."""
    nl = buf.find("\n", pos + PIECE_CHARS, pos + 2 * PIECE_CHARS)
    if nl == -1:
        return pos + 2 * PIECE_CHARS
    return nl if before_newline else nl + 1


def _file_document(src: Source, blocks: Iterable[str],
                   skips: SkipCounter) -> Iterator[Tuple[int, str, bool]]:
    """The whole file is one document, exactly as decoded (trailing newline included)."""
    buf, emitted = "", False
    for t in blocks:
        buf += t
        if len(buf) < 2 * PIECE_CHARS:
            continue
        if not emitted and not buf.strip():
            continue  # only whitespace so far: keep, it may still be an empty document
        pos = 0
        while len(buf) - pos >= 2 * PIECE_CHARS:
            c = _cut(buf, pos, before_newline=False)
            yield 0, buf[pos:c], False
            emitted, pos = True, c
        buf = buf[pos:]
    if not emitted and not buf.strip():
        skips.add("empty_documents", where=src.path)
        return
    yield 0, buf, True


# literal-prefix form (20x faster than a leading ``\r?``); a ``\r`` before it is trimmed below
_SEP = re.compile(r"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*")
_LEADING_BLANK = re.compile(r"(?:[ \t\r\f\v]*\n)*")
_NONBLANK = re.compile(r"[^ \t\r\f\v]")
_TRAILING_TERMINATOR = re.compile(r"\r?\n[ \t\r\f\v]*\Z")


def _paragraph_documents(src: Source, blocks: Iterable[str],
                         skips: SkipCounter) -> Iterator[Tuple[int, str, bool]]:
    """Documents separated by one or more blank (whitespace-only) lines.

    A document is its lines joined by their newlines, without the terminator of its last line;
    blank lines at the start and end of the file are ignored.
    """
    buf, at_start, emitted, ordinal = "", True, False, 0
    it = iter(blocks)
    eof = False
    while not eof:
        t = next(it, None)
        if t is None:
            eof = True
        else:
            buf += t
        pos = 0
        while True:
            if at_start:
                pos = _LEADING_BLANK.match(buf, pos).end()
                if not eof and _NONBLANK.search(buf, pos) is None:
                    break  # maybe the start of another blank line: wait for more text
                at_start = False
            m = _SEP.search(buf, pos)
            if m is not None:
                end = m.start()
                if end > pos and buf[end - 1] == "\r":
                    end -= 1
                yield ordinal, buf[pos:end], True
                ordinal, emitted, at_start, pos = ordinal + 1, False, True, m.end()
                continue
            if len(buf) - pos >= 2 * PIECE_CHARS:
                c = _cut(buf, pos, before_newline=True)
                yield ordinal, buf[pos:c], False
                emitted, pos = True, c
                continue
            break
        buf = buf[pos:]
    rest = _TRAILING_TERMINATOR.sub("", buf)
    if rest.strip():
        yield ordinal, rest, True
    elif emitted:
        yield ordinal, "", True
    elif rest:
        skips.add("empty_documents", where=f"{src.path} (end of file)")


def _merge_short(docs: Iterable[Tuple[int, str, bool]],
                 min_chars: int) -> Iterator[Tuple[int, str, bool]]:
    """Join each paragraph shorter than ``min_chars`` characters to the next paragraph of the same
    file, with a blank line (``"\n\n"``) between them; the joined document keeps the first
    paragraph's ordinal. A short paragraph at the end of a file stays on its own."""
    pending: Optional[Tuple[int, str]] = None
    first = True
    for ordinal, piece, last in docs:
        if first:
            if pending is not None:
                ordinal, piece = pending[0], pending[1] + "\n\n" + piece
                pending = None
            if last and len(piece) < min_chars:
                pending = (ordinal, piece)
                continue
        yield ordinal, piece, last
        first = last
    if pending is not None:
        yield pending[0], pending[1], True


def _pieces(text: str, ordinal: int) -> Iterator[Tuple[int, str, bool]]:
    """One record's document in pieces of at most ``2 * PIECE_CHARS`` characters."""
    pos = 0
    while len(text) - pos > 2 * PIECE_CHARS:
        c = _cut(text, pos, before_newline=False)
        yield ordinal, text[pos:c], False
        pos = c
    yield ordinal, text[pos:], True


def _jsonl_documents(src: Source, opts: ReadOptions, skips: SkipCounter,
                     progress: ProgressFn) -> Iterator[Tuple[int, str, bool]]:
    """One document per JSON Lines record, taken from ``opts.text_key``; ordinal = line number."""
    blocks = iter_byte_blocks(src.path, progress)
    first = next(blocks, b"")
    if looks_binary(first):
        warn(f"{src.path}: looks binary (NUL bytes in the first {SNIFF_BYTES} bytes); skipped")
        skips.add("binary_files", where=src.path)
        for _ in blocks:
            pass
        return
    before = _INVALID[0]

    def bad(kind: str, lineno: int, what: str):
        where = f"{src.path}:{lineno}"
        if opts.strict:
            raise DataPrepError(f"{where}: {what} (--strict); fix the line or drop --strict to "
                                f"skip and count such lines")
        skips.add(kind, where=where)

    def chunks():
        yield first
        yield from blocks

    for lineno, line in _jsonl_lines(chunks(), opts.max_line_bytes, bad):
        text = _jsonl_record(line, lineno, src, opts, skips, bad)
        if text is not None:
            yield from _pieces(text, lineno)
    n_bad = _INVALID[0] - before
    if n_bad:
        skips.add("invalid_utf8_sequences", n_bad, where=src.path)
        skips.add("files_with_invalid_utf8", 1, where=src.path)


def _jsonl_lines(chunks: Iterable[bytes], max_line_bytes: int,
                 bad: Callable[[str, int, str], None]) -> Iterator[Tuple[int, bytes]]:
    """``(line number, line)`` of a byte stream cut at ``\\n`` (the last line may lack one); a line
    longer than ``max_line_bytes`` is reported to ``bad`` and dropped without being held whole."""
    too_long_msg = f"line longer than --max-line-bytes={max_line_bytes}"
    carry: List[bytes] = []
    carry_len, lineno, too_long = 0, 0, False
    for b in chunks:
        start = 0
        while True:
            nl = b.find(b"\n", start)
            if nl == -1:
                if not too_long:
                    carry.append(b[start:])
                    carry_len += len(b) - start
                    if carry_len > max_line_bytes:
                        bad("lines_too_long", lineno + 1, too_long_msg)
                        carry, carry_len, too_long = [], 0, True
                break
            lineno += 1
            if too_long:
                too_long = False
            else:
                line = b"".join(carry) + b[start:nl] if carry else b[start:nl]
                carry, carry_len = [], 0
                if len(line) > max_line_bytes:
                    bad("lines_too_long", lineno, too_long_msg)
                else:
                    yield lineno, line
            start = nl + 1
    if carry and not too_long:
        yield lineno + 1, b"".join(carry)


def _jsonl_record(line: bytes, lineno: int, src: Source, opts: ReadOptions, skips: SkipCounter,
                  bad: Callable[[str, int, str], None]) -> Optional[str]:
    """The text of one JSON Lines record, or None (a blank line, or a bad record counted or, with
    --strict, refused by ``bad``)."""
    if not line.strip():
        return None
    key = opts.text_key
    try:
        text = line.decode("utf-8", _HANDLERS[opts.errors])
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{src.path}:{lineno}: invalid UTF-8 at column byte {e.start} "
                            f"({e.reason}); fix the line, or pass --errors replace or "
                            f"--errors skip") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        bad("json_errors", lineno, f"not valid JSON ({e.msg} at column {e.colno})")
        return None
    if not isinstance(obj, dict) or key not in obj:
        bad("json_missing_key", lineno, f"no key {key!r} (set --text-key)")
        return None
    val = obj[key]
    if not isinstance(val, str):
        bad("json_non_string", lineno, f"key {key!r} holds {type(val).__name__}, not a string")
        return None
    val = clean_unicode(val, opts.errors, skips, f"{src.path}:{lineno}")
    if not val.strip():
        skips.add("empty_documents", where=f"{src.path}:{lineno}")
        return None
    return val


def iter_source_documents(src: Source, opts: ReadOptions, skips: SkipCounter,
                          progress: ProgressFn = None) -> Iterator[Tuple[int, str, bool]]:
    """Yield ``(ordinal, piece, last)`` for the documents of one source (see module docstring).

    Empty/whitespace-only documents, binary files and bad JSONL lines are counted in ``skips``
    and not yielded. Pieces of one document are consecutive; the last has ``last=True``.
    """
    if src.fmt == "jsonl":
        yield from _jsonl_documents(src, opts, skips, progress)
        return
    if src.fmt == "parquet":
        from .parquet import parquet_documents

        yield from parquet_documents(src, opts, skips, progress, _pieces,
                                     lambda t, where: clean_unicode(t, opts.errors, skips, where))
        return
    blocks = _iter_text_blocks(src, opts, skips, progress)
    if opts.doc_sep == "blank-line":
        docs = _paragraph_documents(src, blocks, skips)
        yield from (_merge_short(docs, opts.merge_short) if opts.merge_short else docs)
    else:
        yield from _file_document(src, blocks, skips)


def iter_documents(sources: Sequence[Source], opts: ReadOptions, skips: SkipCounter,
                   progress: ProgressFn = None) -> Iterator[Tuple[int, int, str, bool]]:
    """Yield ``(source_index, ordinal, piece, last)`` over all sources in order."""
    opts.validate()
    for i, src in enumerate(sources):
        for ordinal, piece, last in iter_source_documents(src, opts, skips, progress):
            yield i, ordinal, piece, last
