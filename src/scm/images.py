"""Writing images: model-space tensors ([-1, 1] pixels) to PNG grids or files, atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["grid", "report_scale", "save_png", "to_uint8"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → uint8 [N, H, W, C] (values clipped)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile N images into one uint8 array [H', W', C] with `pad` pixels of white between them; `scale`
    enlarges every image by nearest-neighbour pixel repetition (small images stay legible in reports)."""
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    imgs = to_uint8(x)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    return out


def report_scale(resolution: int, target: int = 96) -> int:
    """The nearest-neighbour enlargement that shows an image of `resolution` pixels at about `target` pixels
    (28-px digits ×3; 64 px and more as they are)."""
    return max(1, round(target / resolution))


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Save a uint8 [H, W, C] array as PNG via a temporary file and rename."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
