"""WebDataset tar writing on the standard library's ``tarfile``, for ``llp-prep``.

``webdataset.TarWriter`` is a thin layer over ``tarfile``, but ``import webdataset`` imports torch:
about 2 CPU-seconds per process, paid by every ``llp-prep shard`` task of an array job and by
``llp-prep merge`` (measured in ``docs/data_prep.md``, "Throughput"). :class:`SampleTarWriter`
writes the same bytes as ``webdataset.TarWriter(fileobj, encoder=False, mtime=M, user=U,
group=G, mode=O)`` with USTAR headers (``tests/test_data_prep_shards.py`` compares the two), so
``llp-prep`` never imports torch. Reading stays with webdataset (the training loader).
"""
from __future__ import annotations

import io
import tarfile
from typing import Dict

__all__ = ["SampleTarWriter"]


class SampleTarWriter:
    """Write WebDataset samples to the binary file object ``fileobj`` as an uncompressed USTAR tar
    in stream mode (only ``fileobj.write`` is called).

    Each sample's members are written in sorted order as ``KEY.EXT`` entries with modification time
    ``mtime``, owner ``user``/``group`` and permissions ``mode``: the layout of
    ``webdataset.TarWriter`` (WebDataset's format: one key, no dots, per sample)."""

    def __init__(self, fileobj, mtime: float, user: str, group: str, mode: int = 0o444) -> None:
        self.mtime, self.user, self.group, self.mode = mtime, user, group, mode
        self.tarstream = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, members: Dict[str, bytes]) -> int:
        """Add sample ``key`` with ``members`` (extension -> bytes); returns the bytes of content.

        Raises ``ValueError`` for a key with a dot or a member that is not bytes (tarfile's
        ``OSError`` on a failed write passes through)."""
        if "." in key:
            raise ValueError(f"sample key {key!r} holds a dot; WebDataset keys cannot")
        total = 0
        for ext in sorted(members):
            data = members[ext]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"member {ext!r} of sample {key!r} is {type(data).__name__}, not bytes")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = self.mode
            info.uname = self.user
            info.gname = self.group
            self.tarstream.addfile(info, io.BytesIO(data))
            total += info.size
        return total

    def close(self) -> None:
        """Write the end-of-archive blocks (the file object itself stays open)."""
        self.tarstream.close()
