"""Data sets: a name or a path → an ImageData (in memory) or PreparedData (memory-mapped), in the model's space.

- "mnist" (or "mnist:train": 60,000 digits) and "mnist:test" (10,000): the built-in MNIST (`scm data fetch mnist`);
- "mnist-captions" (or "mnist-captions:train") and "mnist-captions:test": MNIST with generated captions
  (`scm.data.captions`);
- a folder of PNG/JPEG images (recursive; class sub-folders become labels; captions from sidecar .txt files or a
  metadata.jsonl: `scm.data.caption_files`);
- a folder with the MNIST IDX files (train split), or a `cifar-10-batches-py` folder (train split);
- an .npz with images under 'x' (and labels under 'y');
- a prepared directory (`scm data prepare` / `scm data encode`: memory-mapped, for data larger than memory).
A ":test" suffix on an IDX or CIFAR folder picks its test split. Both kinds of data set satisfy
`scm.data.dataset.Dataset`; `load_dataset` and the two classes are this package's public API, re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from scm.data.builtin import BUILTIN, load_builtin, load_cifar10_batches
from scm.data.builtin import _mnist_from_idx as mnist_from_idx
from scm.data.images import ImageData, load_folder, load_npz
from scm.data.prepared import PreparedData, is_prepared, load_prepared
from scm.errors import DataError

__all__ = ["ImageData", "PreparedData", "load_dataset"]


def load_dataset(path: str | Path) -> ImageData | PreparedData:
    spec = str(path)
    if spec in BUILTIN:
        return load_builtin(spec)
    split = "train"
    if spec.endswith(":test") or spec.endswith(":train"):
        spec, split = spec.rsplit(":", 1)
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if p.is_dir():
        if is_prepared(p):
            return load_prepared(p)
        if (p / "data_batch_1").is_file() or (p / "test_batch").is_file():
            return load_cifar10_batches(p, split)
        if any(p.glob("train-images*idx3-ubyte*")):
            import torch

            arrays = mnist_from_idx(p)
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            return ImageData(torch.from_numpy(x[:, None].copy()), torch.from_numpy(y), f"MNIST IDX {split} ({p})",
                             None, "uint8")
        return load_folder(p)
    if p.suffix.lower() == ".npz":
        return load_npz(p)
    raise DataError(f"{p}: unsupported data file (expected a folder of images or an .npz file)")
