"""Writing WebDataset shards: :class:`ShardWriter` (numbered tar files, each complete or absent, and their ``sizes.json``).

Each sample is stored as the members :func:`~ernievil2.data.shard_codec.sample_to_members` lays out.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from ernievil2.atomic import atomic_write

from .sample import RawSample
from .shard_codec import sample_to_members

_TAR_BLOCK = 512


def _member_size(n_bytes: int) -> int:
    """Bytes one regular member takes in a tar: a header block plus data padded to 512."""
    return _TAR_BLOCK + -(-n_bytes // _TAR_BLOCK) * _TAR_BLOCK


class ShardWriter:
    """Write :class:`RawSample` objects into numbered WebDataset tar shards.

    Shards are named ``{prefix}-{index:06d}.tar``. Each is written as ``<name>.tar.tmp`` and renamed
    to its final name only once it is closed, so a ``*.tar`` in ``out_dir`` is always complete. On a
    normal close ``sizes.json`` (``{shard file name: n_samples}`` for this writer's shards) is written
    atomically. If the ``with`` block raises, the unfinished ``.tmp`` shard is deleted, the shards
    already finished stay (each is complete) and ``sizes.json`` is *not* written: its presence marks
    a finished write. One writer per directory: ``sizes.json`` only lists this writer's shards.

    Output is byte-deterministic: members have mtime 0, uid/gid 0, mode 0644 and no owner names.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = int(max_samples)
        self.max_bytes = max_bytes
        self.sizes: dict[str, int] = {}
        self.shards: list[str] = []
        self.n_written = 0
        self._index = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self._closed = False

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals --------------------------------------------------------------------------
    def _open_next(self) -> None:
        name = f"{self.prefix}-{self._index:06d}.tar"
        self._index += 1
        self._final_path = self.out_dir / name
        self._tmp_path = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp_path is not None and self._final_path is not None
        with open(self._tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path, self._final_path)
        self.sizes[self._final_path.name] = self._count
        self.shards.append(str(self._final_path))
        self._tar = None
        self._tmp_path = None
        self._final_path = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    # -- public -----------------------------------------------------------------------------
    def write(self, sample: RawSample, image_ext: str = "jpg") -> None:
        """Append one sample (image as ``KEY.<image_ext>``, first caption as ``KEY.txt``, ``KEY.json``)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        members = sample_to_members(sample, image_ext)
        size = sum(_member_size(len(d)) for _, d in members)
        if self._tar is not None:
            full = self._count >= self.max_samples
            too_big = self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes
            if full or too_big:
                self._finish_current()
        if self._tar is None:
            self._open_next()
        for name, data in members:
            self._add(name, data)
        self._count += 1
        self._bytes += size
        self.n_written += 1

    def close(self) -> None:
        """Finish the current shard and write ``sizes.json`` atomically. Idempotent."""
        if self._closed:
            return
        self._finish_current()
        with atomic_write(self.out_dir / "sizes.json") as f:
            f.write(json.dumps(self.sizes, indent=1, sort_keys=True) + "\n")
        self._closed = True

    def abort(self) -> None:
        """Drop the unfinished shard (its ``.tmp`` file); finished shards stay, no ``sizes.json``."""
        if self._closed:
            return
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:  # noqa: BLE001 - we are discarding this file anyway
                pass
            self._tar = None
        if self._tmp_path is not None and self._tmp_path.exists():
            self._tmp_path.unlink()
        self._tmp_path = None
        self._closed = True
