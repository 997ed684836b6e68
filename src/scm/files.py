"""Writing a file or a folder atomically: the one way every writer of scm puts something on disk.

A reader never sees a half-written file or folder under its final name, and a crash (or power loss) at any moment
leaves either the old content or the new, never a mix:

    atomic_write(path, data)      data is bytes, a str (UTF-8), or a function that writes a file at the path it
                                  is given (PIL's `save`, `np.savez`, safetensors' `save_file`, `savefig` …)
    atomic_write_json(path, obj)  indented JSON with a trailing newline
    with atomic_folder(path) as tmp:
        ...                       build the folder's content in `tmp`; on a normal exit it becomes `path`

The steps are those of a careful storage system: write to a temporary name in the same folder (so the rename
cannot cross file systems), flush and fsync the file, rename it over the final name, then fsync the folder so
that the rename itself is on disk. A folder is fsynced file by file (including what a library wrote into it)
before it is renamed into place; a temporary left by a crash starts with "." and holds ".tmp-" in its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_folder", "atomic_write", "atomic_write_json", "durable_rename", "fsync_dir", "fsync_tree",
           "publish_folder", "sha256_of", "temporary_name"]


def sha256_of(path: str | Path, offset: int = 0, into=None):
    """A file's bytes from `offset` on, streamed 16 MiB at a time into a SHA-256 (`into`, or a new one); returns it
    (`.digest()`, `.hexdigest()`). The one way scm hashes a file: checkpoints, source images, Inception weights."""
    h = hashlib.sha256() if into is None else into
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new, renamed or removed names) to disk; a file system without that is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (itself included)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process, with the same suffix (some writers add theirs)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write `data` to `path` atomically (module docstring), making its folder if needed; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def durable_rename(path: Path, target: Path) -> Path:
    """Rename `path` to `target` (same folder, replacing an empty folder or a file there) and fsync the folder."""
    os.replace(path, target)
    fsync_dir(Path(target).parent)
    return Path(target)


def publish_folder(tmp: Path, path: Path, *, replace: bool = False) -> Path:
    """Make the finished folder `tmp` appear as `path`: fsync its content, rename, fsync the parent. An existing
    `path` is an error (FileExistsError), unless `replace`: then it is removed first (an empty folder always is)."""
    fsync_tree(tmp)
    if path.is_dir() and not path.is_symlink() and (replace or not any(path.iterdir())):
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        raise FileExistsError(f"{path}: already exists")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder at a temporary name beside `path` and, when the block ends normally, publish it as `path`
    (`publish_folder`); when the block raises, the temporary folder is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish_folder(tmp, path, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
