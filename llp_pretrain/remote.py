"""Datasets at a URL: ``data.path`` (and ``llp-pretrain eval --data``) may be a URL prefix.

Accepted forms (``docs/training.md``, "Shards from URLs"):

* ``http://HOST/ds``, ``https://HOST/ds``: the files are ``PREFIX/manifest.json`` and
  ``PREFIX/<shard name>``, fetched with ``curl`` through webdataset's ``pipe:`` opener;
* ``file:///abs/ds``: a local directory written as a URL (webdataset's ``file:`` opener);
* ``pipe:CMD``: a shell command with ``{name}`` where the file name goes, writing the file to
  stdout, e.g. ``pipe:aws s3 cp s3://bucket/ds/{name} -`` (webdataset's ``pipe:`` opener).

The manifest is fetched first and checked by the one manifest reader
(``data_prep.manifest.parse_manifest``). Shards are streamed through :class:`RetryingReader`:
a transient error (an opener that fails, a connection dropped mid-shard, a command that exits
non-zero, fewer bytes than the manifest's ``bytes``) closes the stream, waits with exponential
backoff and re-reads the file from its start, discarding the bytes already delivered, so the tar
reader sees one unbroken byte stream (no HTTP Range request: this works with any server and any
command). After ``LLP_FETCH_RETRIES`` failed attempts in a row, :class:`ShardFetchError` names the
URL in one line. Shard bytes are then checked sample by sample as for local files
(``llp_pretrain.data.read_shard``).

Environment: ``LLP_FETCH_RETRIES`` (default 5) retries after the first attempt;
``LLP_FETCH_BACKOFF_S`` (default 1.0) seconds before the first retry, doubled each time up to
``LLP_FETCH_BACKOFF_MAX_S`` (default 30); ``LLP_FETCH_CURL_ARGS`` extra ``curl`` options (e.g. a
``--header``), appended as they are.
"""
from __future__ import annotations

import hashlib
import io
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

__all__ = ["URL_PREFIXES", "is_url", "file_url", "ShardFetchError", "RetryingReader", "fetch_bytes",
           "read_url_manifest", "url_sha256", "open_url_samples", "fetch_tokenizer"]

URL_PREFIXES = ("http://", "https://", "file://", "pipe:")
MANIFEST = "manifest.json"
CHUNK = 1 << 20


def is_url(path) -> bool:
    """True for a dataset location that is a URL prefix (:data:`URL_PREFIXES`), not a directory."""
    return isinstance(path, str) and path.startswith(URL_PREFIXES)


def file_url(prefix: str, name: str) -> str:
    """URL of file ``name`` (``manifest.json`` or a shard name) of the dataset at ``prefix``.

    Raises ``ValueError`` for a ``pipe:`` prefix without ``{name}``."""
    if prefix.startswith("pipe:"):
        if "{name}" not in prefix:
            raise ValueError(f"data.path {prefix!r}: a pipe: dataset needs {{name}} where the file name goes, "
                             "e.g. 'pipe:aws s3 cp s3://bucket/ds/{name} -'")
        return prefix.replace("{name}", name)
    return prefix.rstrip("/") + "/" + name


class ShardFetchError(OSError):
    """A dataset file could not be read from its URL after the retries; ``str()`` is one line naming
    the URL, the attempts and the last error. Kept in ``message`` as well: webdataset appends
    context to the ``args`` of exceptions that pass through it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _env_number(name: str, default: float, cast=float):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def _opener_url(url: str) -> str:
    """What webdataset's ``gopen`` opens for ``url``: http(s) through ``pipe:curl`` with our own
    timeouts and no curl-side retries (the retries and their backoff are :class:`RetryingReader`'s)."""
    if url.startswith(("http://", "https://")):
        extra = os.environ.get("LLP_FETCH_CURL_ARGS", "")
        # -f: HTTP errors are failures (exit 22); -s: no progress meter and no messages (the exit status
        # is reported by RetryingReader); a transfer slower than 1 byte/s for 60 s is a failure (a stalled
        # server never hangs the run)
        return (f"pipe:curl -fsL --connect-timeout 30 --speed-limit 1 --speed-time 60 {extra} "
                f"{shlex.quote(url)}")
    return url


#: curl exit statuses worth naming in a message (``man curl``, EXIT CODES)
CURL_EXITS = {6: "could not resolve host", 7: "could not connect", 18: "transfer closed early (partial file)",
              22: "HTTP error status (>= 400)", 28: "timed out", 35: "TLS handshake failed",
              52: "empty reply from server", 56: "connection reset while receiving"}


def _describe(e: BaseException) -> str:
    text = " ".join(str(e.args[0] if e.args else e).split())
    for code, what in CURL_EXITS.items():
        if f"exit {code} " in text + " " and "curl" in text:
            return f"curl exit {code}: {what}"
    if text.startswith("(") and "exit" in text:  # webdataset's Pipe: "(args, kw): exit N (read) ..."
        return "command " + text[text.index("exit"):].split("(read)")[0].strip()
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class RetryingReader(io.RawIOBase):
    """A read-only binary stream of the file at ``url`` that survives transient errors (module doc).

    ``size``: the file's length in bytes (the manifest's ``bytes``), or None when unknown; a stream
    that ends short of it is a transient error, one that runs past it raises :class:`ShardFetchError`
    at once (the file changed). Raises :class:`ShardFetchError` after ``retries`` failed attempts in a
    row (an attempt that delivers new bytes resets the count)."""

    def __init__(self, url: str, size: Optional[int] = None, retries: Optional[int] = None,
                 backoff_s: Optional[float] = None, backoff_max_s: Optional[float] = None):
        super().__init__()
        self.url, self.size = url, size
        self.retries = int(_env_number("LLP_FETCH_RETRIES", 5, int)) if retries is None else retries
        self.backoff_s = _env_number("LLP_FETCH_BACKOFF_S", 1.0) if backoff_s is None else backoff_s
        self.backoff_max_s = _env_number("LLP_FETCH_BACKOFF_MAX_S", 30.0) if backoff_max_s is None else backoff_max_s
        self.pos = 0          # bytes delivered to the reader
        self.failures = 0     # failed attempts in a row
        self.reopens = 0      # re-reads after a failure (for tests and logs)
        self._src = None
        self._src_pos = 0     # bytes read from the current source
        self._done = False

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        import webdataset as wds  # imported when a URL is read: it pulls in torch

        self._src = wds.gopen(_opener_url(self.url), "rb")
        self._src_pos = 0

    def _drop_source(self) -> None:
        src, self._src = self._src, None
        if src is None:
            return
        proc = getattr(src, "proc", None)  # webdataset's Pipe: stop the command before closing
        if proc is not None and proc.poll() is None:
            proc.kill()
        try:
            src.close()
        except Exception:  # the command's exit status after a kill or an error is not news
            pass

    def _end_of_source(self) -> Optional[str]:
        """Close a source that reached its end; the reason it failed (a command's non-zero exit
        status, which webdataset's ``Pipe`` reports on close) or None."""
        src, self._src = self._src, None
        try:
            src.close()
        except Exception as e:
            return _describe(e)
        return None

    def _failed(self, why: str) -> None:
        self._drop_source()
        self.failures += 1
        where = f"at byte {self.pos}" + (f" of {self.size}" if self.size is not None else "")
        if self.failures > self.retries:
            raise ShardFetchError(f"{self.url}: could not be read after {self.failures} attempt(s) ({why}, {where}); "
                                  "check that the URL is reachable and serves the dataset's files, then resume "
                                  "with --resume auto")
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (self.failures - 1))
        print(f"[llp-pretrain] warning: {self.url}: {why} {where}; retrying in {delay:.1f} s "
              f"(attempt {self.failures + 1} of {self.retries + 1})", file=sys.stderr, flush=True)
        time.sleep(delay)
        self.reopens += 1

    def _read_some(self, n: int) -> Optional[bytes]:
        """Up to ``n`` new bytes from the current source (opened, and the bytes already delivered
        skipped, as needed); b"" at a verified end; None after a failure (the caller retries)."""
        try:
            if self._src is None:
                self._open()
            while self._src_pos < self.pos:  # a re-read: skip what the reader already has
                chunk = self._src.read(min(CHUNK, self.pos - self._src_pos))
                if not chunk:
                    why = self._end_of_source()
                    self._failed(why or f"ended after {self._src_pos} bytes while skipping to byte {self.pos}")
                    return None
                self._src_pos += len(chunk)
            data = self._src.read(n)
        except ShardFetchError:
            raise
        except Exception as e:  # opener, network and command errors: all retried
            self._failed(_describe(e))
            return None
        if not data:
            why = self._end_of_source()
            if why is None and self.size is not None and self.pos < self.size:
                why = f"ended after {self.pos} bytes, the manifest lists {self.size}"
            if why is not None:
                self._failed(why)
                return None
            return b""
        self._src_pos += len(data)
        if self.size is not None and self.pos + len(data) > self.size:
            self._drop_source()
            raise ShardFetchError(f"{self.url}: longer than the {self.size} bytes the manifest lists (the file "
                                  "changed after the manifest was written); restore it or rebuild the dataset")
        return data

    def readinto(self, b) -> int:
        if self._done or len(b) == 0:
            return 0
        while True:
            data = self._read_some(len(b))
            if data is None:
                continue
            if not data:
                self._done = True
                return 0
            self.failures = 0
            b[:len(data)] = data
            self.pos += len(data)
            return len(data)

    def close(self) -> None:
        self._drop_source()
        super().close()


def fetch_bytes(url: str, size: Optional[int] = None) -> bytes:
    """The whole file at ``url``, read with :class:`RetryingReader`. Raises :class:`ShardFetchError`."""
    with RetryingReader(url, size) as r:
        return r.read()


def read_url_manifest(prefix: str) -> Dict:
    """Fetch and check ``PREFIX/manifest.json`` with the one manifest reader.

    Raises :class:`ShardFetchError` when it cannot be fetched, ``ValueError`` (one line naming the
    URL and the key) when it is not a valid manifest."""
    from data_prep.errors import DataPrepError
    from data_prep.manifest import parse_manifest

    url = file_url(prefix, MANIFEST)
    raw = fetch_bytes(url)
    try:
        return parse_manifest(raw, url)
    except DataPrepError as e:
        raise ValueError(str(e)) from None


def url_sha256(prefix: str, name: str = MANIFEST) -> str:
    """sha256 (hex) of file ``name`` of the dataset at ``prefix`` (fetched)."""
    return hashlib.sha256(fetch_bytes(file_url(prefix, name))).hexdigest()


def open_url_samples(url: str, size: Optional[int] = None) -> Iterator[Dict]:
    """Raw WebDataset samples (``{"__key__", "tokens.npy", "json", ...}`` of bytes) of the shard at
    ``url``, in tar order, read through a :class:`RetryingReader` and webdataset's public tar
    iterators. Raises :class:`ShardFetchError` when the shard cannot be read after the retries."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = RetryingReader(url, size)
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def tokenizer_cache_dir() -> Path:
    """Where fetched tokenizers are kept, by sha256: ``$XDG_CACHE_HOME/llp-pretrain/tokenizers``
    (default ``~/.cache/llp-pretrain/tokenizers``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llp-pretrain" / "tokenizers"


def fetch_tokenizer(prefix: str, manifest: Optional[Dict]) -> Optional[Path]:
    """The dataset's own copy of its tokenizer (``PREFIX/<tokenizer.copy>``, written by ``llp-prep
    shard``), fetched once into :func:`tokenizer_cache_dir` as ``<sha256>.model`` and used only when
    its sha256 is the manifest's ``tokenizer.sha256``. None (with a warning) when the manifest names
    no copy or hash, or the copy cannot be fetched (one attempt: it is optional) or differs."""
    tok = (manifest or {}).get("tokenizer") or {}
    name, want = tok.get("copy"), tok.get("sha256")
    if not isinstance(name, str) or not isinstance(want, str) or "/" in name:
        return None
    dst = tokenizer_cache_dir() / f"{want}.model"
    if dst.is_file() and hashlib.sha256(dst.read_bytes()).hexdigest() == want:
        return dst
    url = file_url(prefix, name)
    try:
        with RetryingReader(url, retries=0) as r:
            raw = r.read()
    except ShardFetchError as e:
        print(f"[llp-pretrain] warning: the dataset's tokenizer copy is unavailable ({e.message})", file=sys.stderr,
              flush=True)
        return None
    if hashlib.sha256(raw).hexdigest() != want:
        print(f"[llp-pretrain] warning: {url} is not the tokenizer the manifest names (sha256 differs); not used",
              file=sys.stderr, flush=True)
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, dst)
    return dst
