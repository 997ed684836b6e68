"""Image data sets held in memory: folders of PNG/JPEG files (with their captions, `scm.data.caption_files`) and
.npz arrays.

Pixels are kept as uint8 [N, C, H, W] (or float for data that is not 8-bit, e.g. latents) and mapped to the
model's space on the fly: 8-bit images and [0, 1] floats to [-1, 1] (the paper's pixel convention, σ_d = 0.5),
anything else used as is. Every problem names the file and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scm.data.caption_files import check_captions, folder_captions
from scm.data.rows import choose
from scm.errors import DataError

__all__ = ["ArrayShape", "ImageData", "folder_labels", "load_folder", "load_npz"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ArrayShape:
    """What a data set's `images` ([N, C, …]), `labels`/`class_names`, `captions` and `text` tell: its size, item
    shape, channels, classes, conditioning tensors and captions (shared by `ImageData` and
    `scm.data.prepared.PreparedData`; the interface they satisfy is `scm.data.dataset.Dataset`)."""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.images.shape[1:])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    @property
    def conditions(self) -> tuple[str, ...]:
        text = self.text
        prompts = ("text", "text_mask", *(("text_pooled",) if text.get("pooled_width") else ())) if text else ()
        return ("labels",) * (self.labels is not None) + prompts

    def _conditioning(self, index, device) -> dict[str, torch.Tensor]:
        """The conditioning tensors of items `index`: their labels, for a labelled set."""
        if self.labels is None:
            return {}
        return {"labels": self.labels[torch.as_tensor(index).cpu()].to(device)}

    def _items(self, index) -> np.ndarray:
        """`index` (any integer sequence; negative from the end) as int64 positions in 0 … N − 1."""
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items")
        return np.where(idx < 0, idx + len(self), idx)

    def _captions_at(self, idx: np.ndarray) -> list[list[str]]:
        return [self.captions[i] for i in idx.tolist()]

    def caption_of(self, index, choice: torch.Generator | None = None) -> list[str]:
        """The caption each item of `index` takes: drawn uniformly among its captions with the CPU generator `choice`
        (one draw per item, as `batch` draws: a generator in the same state gives the same captions), or its first
        when `choice` is None."""
        if self.captions is None:
            raise DataError(f"{self.source}: no captions", key="data")
        captions = self._captions_at(self._items(index))
        pick = choose(np.array([len(c) for c in captions], dtype=np.int64), choice)
        return [c[k] for c, k in zip(captions, pick.tolist(), strict=True)]


@dataclass
class ImageData(ArrayShape):
    images: torch.Tensor                    # uint8 [N, C, H, W], or float [N, C, H, W] (H and W may differ); or
                                            # clips [N, C, T, H, W], waveforms [N, C, L]
    labels: torch.Tensor | None             # int64 [N] or None
    source: str
    class_names: list[str] | None = None
    value_range: str = "uint8"              # "uint8" (0..255) | "unit" ([0, 1] floats) | "raw" (used as is)
    captions: list[list[str]] | None = None  # one list of ≥ 1 captions per image, or None

    def __post_init__(self):
        if self.images.ndim < 3:  # [N, C, H, W] images; also [N, C, T, H, W] clips and [N, C, L] waveforms
            raise DataError(f"{self.source}: items must be [N, C, …] (images [N, C, H, W]), got shape "
                            f"{tuple(self.images.shape)}")
        if len(self) == 0:
            raise DataError(f"{self.source}: the data set is empty")
        if self.labels is not None and self.labels.shape != (len(self),):
            raise DataError(f"{self.source}: {len(self)} images but labels of shape {tuple(self.labels.shape)}")
        if self.images.is_floating_point() and not bool(torch.isfinite(self.images).all()):
            raise DataError(f"{self.source}: the images contain NaN or Inf values")
        if self.labels is not None and bool((self.labels < 0).any()):
            raise DataError(f"{self.source}: labels must be >= 0")
        if self.captions is not None:
            check_captions(self.captions, len(self), self.source)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Stored values → model space (float32): [-1, 1] for pixels."""
        if self.value_range == "uint8":
            return x.float() / 127.5 - 1
        if self.value_range == "unit":
            return x.float() * 2 - 1
        return x.float()

    @property
    def latent(self) -> dict | None:
        """Images in memory are pixels (latents are prepared directories, `scm.data.latents`)."""
        return None

    @property
    def text(self) -> dict | None:
        """None: captions in memory are text; their embeddings are made into a prepared set (`scm data encode`)."""
        return None

    def batch(self, index: torch.Tensor, device=None, choice: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Items `index` in the model's space on `device`, and their conditioning tensors (`conditions`; `choice`
        picks captions of a set with prompt embeddings, which a set in memory never has)."""
        return self.to_model(self.images[index]).to(device), self._conditioning(index, device)

    def null_text(self) -> dict[str, torch.Tensor]:
        """A set in memory has no prompt embeddings: DataError."""
        raise DataError(f"{self.source}: no prompt embeddings; encode its captions into a prepared set first "
                        "(scm.data.prompts.encode_captions)", key="data")

    def subset(self, start: int, stop: int | None = None, source: str | None = None) -> ImageData:
        """Items start … stop − 1."""
        sl = slice(start, stop)
        return ImageData(self.images[sl], None if self.labels is None else self.labels[sl], source or self.source,
                         self.class_names, self.value_range, None if self.captions is None else self.captions[sl])

    def describe(self) -> str:
        lo, hi = (float(v) for v in (self.images.min(), self.images.max()))
        space = {"uint8": "8-bit pixels → [-1, 1]", "unit": "[0, 1] floats → [-1, 1]", "raw": "used as is"}
        classes = f", {self.num_classes} classes" if self.labels is not None else ", unlabelled"
        captions = f", {sum(map(len, self.captions))} captions" if self.captions is not None else ""
        return (f"{self.source}: {len(self)} images, {'×'.join(map(str, self.shape[1:]))}, {self.channels} channel(s)"
                f"{classes}{captions}, values {lo:g}..{hi:g} ({space[self.value_range]})")


def _decode(path: Path) -> np.ndarray:
    """[H, W, 1] (greyscale) or [H, W, 3] uint8; 16-bit samples by round(v / 257), as `scm.data.preprocess`."""
    from scm.data import preprocess as pp

    img = pp.open_image(path)  # decodes fully (16-bit colour at full depth): a truncated file raises here
    try:
        mode = img.mode
        if mode.startswith("I;16") or mode == "I":
            arr = pp.sixteen_to_eight(np.asarray(img), str(path), mode)[:, :, 0]
        else:
            img = img.convert("L" if mode in ("L", "F", "1") else "RGB") if mode not in ("L", "RGB") else img
            arr = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    finally:
        img.close()
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_folder(root: Path) -> ImageData:
    """Every PNG/JPEG under root (recursive). If every image sits in a first-level sub-folder, the sorted
    sub-folder names are the classes; captions from sidecar .txt files or a metadata.jsonl
    (`scm.data.caption_files`) are kept."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no PNG or JPEG images found (searched recursively)")
    captions = folder_captions(root, files)  # before decoding: a caption error is found at once
    arrays, first = [], None
    for f in files:
        a = _decode(f)
        if first is None:
            first = (f, a.shape)
        elif a.shape != first[1]:
            h, w, c = a.shape
            h0, w0, c0 = first[1]
            raise DataError(
                f"{f}: {h}×{w} with {c} channel(s), but {first[0]} is {h0}×{w0} with {c0} channel(s); "
                "all images of a data set must have the same size and channels"
            )
        arrays.append(a)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels, names = folder_labels([f.relative_to(root) for f in files])
    return ImageData(images, None if labels is None else torch.from_numpy(labels), str(root), names, "uint8",
                     captions)


def folder_labels(rel: list[Path]) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels and class names from relative paths: the sorted first-level sub-folders, when every file has one."""
    if not all(len(r.parts) >= 2 for r in rel):
        return None, None
    names = sorted({r.parts[0] for r in rel})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[r.parts[0]] for r in rel], dtype=np.int64), names


def load_npz(path: Path) -> ImageData:
    """An .npz with images under 'x', 'images' or 'arr_0' ([N, H, W], [N, H, W, C] or [N, C, H, W]; uint8,
    or floats) and optional integer labels under 'y' or 'labels'."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError …
        raise DataError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from None
    key = next((k for k in ("x", "images", "arr_0") if k in arrays), None)
    if key is None:
        raise DataError(f"{path}: no image array; expected a key 'x', 'images' or 'arr_0', found {list(arrays)}")
    x = arrays[key]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        channels_last = x.shape[3] in (1, 2, 3, 4) and x.shape[1] not in (1, 2, 3, 4)
        x = x.transpose(0, 3, 1, 2) if channels_last else x
    else:
        raise DataError(f"{path}: '{key}' must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {x.shape}")
    if x.dtype == np.uint8:
        images, value_range = torch.from_numpy(np.ascontiguousarray(x)), "uint8"
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not bool(torch.isfinite(images).all()):
            raise DataError(f"{path}: '{key}' contains NaN or Inf values")
        value_range = "unit" if float(images.min()) >= 0 and float(images.max()) <= 1 else "raw"
    else:
        raise DataError(f"{path}: '{key}' has unsupported dtype {x.dtype}")
    labels = None
    lkey = next((k for k in ("y", "labels") if k in arrays), None)
    if lkey is not None:
        y = arrays[lkey]
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise DataError(f"{path}: '{lkey}' must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
        labels = torch.from_numpy(y.astype(np.int64))
    return ImageData(images, labels, str(path), None, value_range)
