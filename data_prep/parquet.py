"""Reading Parquet inputs (``*.parquet``, or ``--format parquet``) with pyarrow, one record batch at
a time, so memory stays bounded by a batch (and by pyarrow's read of one row group's column).

One document per row, from the ``--text-key`` column; the ordinal (for the train/val split) is the
row number, counted from 1 like a JSONL line number. The bad-input rules are those of JSON Lines:

- the column is missing, or is not a string column: the file is skipped and counted
  (``parquet_missing_column`` / ``parquet_non_string`` for each of its rows), or refused under
  ``--strict``;
- a null value: counted as ``parquet_non_string`` (``--strict``: refused, naming ``file:row``);
- an empty or whitespace-only value: counted as ``empty_documents``;
- lone surrogates cannot occur (Arrow strings are UTF-8); invalid UTF-8 in a string column follows
  ``--errors``;
- a file that is not Parquet, or is truncated or corrupt: ``DataPrepError`` naming the file.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

from .errors import DataPrepError, SkipCounter

BATCH_ROWS = 1024


def _corrupt(path: str, e: Exception) -> DataPrepError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DataPrepError(f"{path}: not a readable Parquet file ({msg}); re-create or re-download "
                         f"it, or leave it out of --input")


def parquet_documents(src, opts, skips: SkipCounter, progress: Optional[Callable[[int], None]],
                      pieces: Callable[[str, int], Iterator[Tuple[int, str, bool]]],
                      clean: Callable[[str, str], str]) -> Iterator[Tuple[int, str, bool]]:
    """Yield ``(row, piece, last)`` for the documents of Parquet source ``src``.

    ``pieces(text, ordinal)`` cuts a long document into bounded pieces (shared with JSONL);
    ``clean(text, where)`` applies the ``--errors`` policy to lone surrogates.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    key, path = opts.text_key, src.path
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        n_rows = pf.metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _corrupt(path, e) from e

    def refuse_or_count(kind: str, what: str, n: int) -> bool:
        if opts.strict:
            raise DataPrepError(f"{path}: {what} (--strict); fix the file, set --text-key, or drop "
                                f"--strict to skip and count it")
        from .inputs import warn

        warn(f"{path}: {what}; its {n} rows are skipped (counted as {kind})")
        skips.add(kind, n if kind != "parquet_missing_column" else 1, where=path)
        if progress is not None:
            progress(src.size)
        return False

    if key not in schema.names:
        refuse_or_count("parquet_missing_column",
                        f"no column {key!r} (columns: {', '.join(schema.names[:10])})", n_rows)
        return
    typ = schema.field(key).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
            or getattr(pa.types, "is_string_view", lambda t: False)(typ)):
        refuse_or_count("parquet_non_string", f"column {key!r} holds {typ}, not strings", n_rows)
        return
    row, reported = 0, 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[key]):
            col = batch.column(0)
            try:
                values = col.to_pylist()
            except UnicodeDecodeError:
                values = [_decode_lossy(v, opts.errors, path, row + i + 1, skips)
                          for i, v in enumerate(col.cast(pa.binary()).to_pylist())]
            for val in values:
                row += 1
                if val is None:
                    if opts.strict:
                        raise DataPrepError(f"{path}:row {row}: column {key!r} is null (--strict); "
                                            f"fix the row or drop --strict to skip and count it")
                    skips.add("parquet_non_string", where=f"{path}:row {row}")
                    continue
                val = clean(val, f"{path}:row {row}")
                if not val.strip():
                    skips.add("empty_documents", where=f"{path}:row {row}")
                    continue
                yield from pieces(val, row)
            if progress is not None and n_rows:
                done = src.size * row // n_rows
                progress(done - reported)
                reported = done
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _corrupt(path, e) from e


def _decode_lossy(b: Optional[bytes], errors: str, path: str, row: int,
                  skips: SkipCounter) -> Optional[str]:
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "fail":
            raise DataPrepError(f"{path}:row {row}: invalid UTF-8 ({e.reason}); fix the file, or "
                                f"pass --errors replace or --errors skip") from e
        skips.add("invalid_utf8_sequences", where=f"{path}:row {row}")
        return b.decode("utf-8", "replace" if errors == "replace" else "ignore")
