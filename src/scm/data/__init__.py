"""Data sets: a path (image folder or .npz) → an in-memory ImageData in the model's value space."""

from __future__ import annotations

from pathlib import Path

from scm.data.images import DataError, ImageData, load_folder, load_npz

__all__ = ["DataError", "ImageData", "load_dataset"]


def load_dataset(path: str | Path) -> ImageData:
    """Load a data set from a folder of PNG/JPEG images (class sub-folders become labels) or an .npz file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if p.is_dir():
        return load_folder(p)
    if p.suffix.lower() == ".npz":
        return load_npz(p)
    raise DataError(f"{p}: unsupported data file (expected a folder of images or an .npz file)")
