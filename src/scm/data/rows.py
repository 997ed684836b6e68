"""Reading rows of a file of fixed-size rows by index: positioned reads (`os.preadv`) in sorted order, into a fresh
buffer, with one descriptor per process (a forked worker opens its own); or from an array held in memory. Used
for a prepared set's items and its prompt embeddings (`scm.data.prepared`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scm.errors import DataError

__all__ = ["RowFile", "choose", "read_rows"]


def read_rows(fd: int, idx: np.ndarray, row_bytes: int, dtype, shape: tuple[int, ...], base: int = 0,
              path: Path | str = "") -> np.ndarray:
    """Rows base + idx (non-negative int64 [B]) of the file at descriptor `fd` as an array [B, *shape], read in
    sorted order, returned in the given one."""
    order = np.argsort(idx, kind="stable")
    buf = bytearray(row_bytes * idx.size)
    view = memoryview(buf)
    for slot, i in enumerate(idx[order].tolist()):
        n = os.preadv(fd, [view[slot * row_bytes:(slot + 1) * row_bytes]], (base + i) * row_bytes)
        if n != row_bytes:
            raise DataError(f"{path}: short read at row {base + i} (truncated file?)")
    rows = np.frombuffer(buf, dtype=dtype).reshape(idx.size, *shape)
    out = np.empty_like(rows)
    out[order] = rows
    return out


class RowFile:
    """A file of `count` rows [*shape] of `dtype` (C order), read by index (`read`), or held in memory."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...], count: int, in_memory: bool):
        self.path, self.dtype, self.shape, self.count = Path(path), np.dtype(dtype), tuple(shape), count
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.array = np.fromfile(self.path, dtype=self.dtype).reshape(count, *self.shape) if in_memory else None
        self._fd: tuple[int, int] | None = None

    def _descriptor(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return self._fd[1]

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Rows idx (int64, each in 0 … count − 1) as [B, *shape]."""
        if self.array is not None:
            return self.array[idx]
        return read_rows(self._descriptor(), idx, self.row_bytes, self.dtype, self.shape, path=self.path)


def choose(counts: np.ndarray, choice: torch.Generator | None) -> np.ndarray:
    """For items with `counts` captions each (int64 [B], ≥ 1): which caption each takes, uniformly drawn with the
    CPU generator `choice` (one float64 per item), or the first (0) when `choice` is None."""
    if choice is None:
        return np.zeros(len(counts), dtype=np.int64)
    u = torch.rand(len(counts), generator=choice, dtype=torch.float64).numpy()
    return np.minimum((u * counts).astype(np.int64), counts - 1)
