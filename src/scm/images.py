"""Writing images: model-space tensors ([-1, 1] pixels) to PNG grids or files, atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from scm.files import atomic_write

__all__ = ["encode_png", "grid", "report_scale", "save_png", "to_pil", "to_uint8"]


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


def report_scale(shape: tuple[int, ...], target: int = 96) -> int:
    """The nearest-neighbour enlargement that shows images of `shape` ([..., H, W]) at about `target` pixels on
    their longer side (28-px digits ×3; 64 px and more as they are)."""
    return max(1, round(target / max(shape[-2:])))


def to_pil(array: np.ndarray):
    """uint8 [H, W, C] with C = 1 or 3 as a PIL image (mode L or RGB)."""
    from PIL import Image

    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def encode_png(array: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) as PNG bytes, in memory."""
    buf = io.BytesIO()
    to_pil(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Save a uint8 [H, W, C] array as PNG, atomically (`scm.files`)."""
    img = to_pil(array)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
