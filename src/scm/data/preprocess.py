"""Decoding and preprocessing of images for a prepared data set (`scm.data.prepare`): every rule in one place.

Decoding. A file is opened with Pillow and decoded fully (a truncated or undecodable file raises `DataError`
naming it); GIF, WebP and TIFF files give their first frame. EXIF orientation is not applied (as in ADM and
EDM2's dataset tool).

Modes → 8-bit greyscale ("L") or colour ("RGB"), in this order:
- 16-bit samples → 8 bits by round(v / 257), the nearest 8-bit value on the same scale (the inverse of the
  usual 8 → 16 bit expansion v·257; 65535 → 255, 32768 → 128), computed exactly in integers as
  (v + 128) // 257, not clipped at 255 (Pillow's "I;16" → "L") nor truncated to the high byte (v >> 8, how
  Pillow decodes 16-bit colour). Greyscale ("I;16", "I;16B", "I;16L", and "I" holding values 0..65535) is
  converted from Pillow's 16-bit image; 16-bit colour (PNG "RGB;16B", "RGBA;16B", grey + alpha "LA;16B", and
  the TIFF raw modes "RGB;16L" …), which Pillow gives as 8-bit, is decoded a second time for its low bytes by
  `open_image`, so that every sample is rounded from its full 16 bits. A 16-bit transparent colour (PNG tRNS)
  is matched on all 16 bits and becomes alpha. "I" values outside 0..65535, 32-bit float images ("F") and
  16-bit colour that cannot be decoded at full depth are refused.
- bilevel "1" → "L" (0 / 255); palette "P" → "RGBA" when it has a transparent colour, else "RGB"; "L" and
  "RGB" with a transparent colour (PNG tRNS) → "LA" / "RGBA"; "PA", "La", "RGBa" → "LA" / "RGBA";
  "CMYK" (and "YCbCr", "LAB", "HSV", "RGBX") → "RGB" by Pillow's conversion.
- alpha ("LA", "RGBA"): `alpha="white"` (default) composites on white, round((c·a + 255·(255 − a)) / 255)
  per channel (a 50 % red pixel becomes (255, 128, 128)); `alpha="drop"` keeps the colour values as they are
  and discards alpha (transparent areas then show whatever colour they store, often black).
- channels: greyscale → 3 channels by replication when 3 are asked; colour → 1 channel by Pillow's "L"
  conversion (ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B) when 1 is asked.

Geometry (`center_crop_resize`): the ImageNet preprocessing of ADM (Dhariwal & Nichol 2021, guided-diffusion's
`center_crop_arr`), which EDM2's dataset_tool uses for images of another size: while the shorter side is at least
2R, halve the image with a box filter (area averaging); then resize with bicubic interpolation so that the
shorter side is R (the longer side rounded to the nearest pixel); then crop the central R×R square (offsets
rounded down). An R×R image is left unchanged. One departure bounds the memory: an image so thin that the bicubic
resize would make more than MAX_ASPECT·R² pixels (a 1×2000 strip at R = 1024: 2 billion) is first cut to its
central MAX_ASPECT:1 part (whole pixels, offsets rounded down), then resized as above; the crop then comes from the
same central region, resampled from a grid that differs by the rounding of that cut.

Arrays already in memory (an .npz, MNIST, …) go through the same rules: [C, H, W] uint8 with C = 1, 2, 3, 4
is read as "L", "LA", "RGB", "RGBA".
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np

from scm.errors import DataError

__all__ = ["ALPHA", "SIXTEEN_BIT", "SUFFIXES", "center_crop_resize", "image_channels", "open_image",
           "preprocess_array", "preprocess_image", "sixteen_bit_colour", "sixteen_to_eight", "to_array"]

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ALPHA = ("white", "drop")
SIXTEEN_BIT = "round(v / 257)"
GREY_MODES = ("1", "L", "LA", "La", "I", "F")
ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
SIXTEEN_BIT_COLOUR = re.compile(r"(RGB|RGBA|LA);16([BLN])")  # Pillow's raw modes that it decodes to 8 bits


def open_image(path: Path, decode: bool = True):
    """The image at `path` (its first frame), decoded fully unless `decode=False` (then only its header is
    read: enough for its mode and size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings on odd metadata; errors still raise
            img = Image.open(path)
            sixteen = sixteen_bit_colour(img)
            if decode:
                img.load()  # a truncated file raises here
                if sixteen:
                    img = _full_depth(img, path, sixteen)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return img


def sixteen_bit_colour(img) -> str | None:
    """The raw mode ("RGB;16B", "RGBA;16L", "LA;16B" …) of a not yet decoded image whose colour samples are
    16-bit (which Pillow decodes to 8 bits, keeping the high bytes); None for any other image."""
    modes = {_rawmode(t) for t in getattr(img, "tile", None) or ()}
    mode = modes.pop() if len(modes) == 1 else None
    return mode if mode and SIXTEEN_BIT_COLOUR.fullmatch(mode) else None


def _rawmode(tile) -> str | None:
    args = tile[3]
    first = args[0] if isinstance(args, tuple) and args else args
    return first if isinstance(first, str) else None


def _decode_as(path, rawmode: str) -> np.ndarray:
    """The file at `path` decoded with another raw mode of the same bits per pixel (the other byte of each
    16-bit sample)."""
    from PIL import Image

    with Image.open(path) as img:
        tiles = []
        for t in img.tile:
            args = (rawmode, *t[3][1:]) if isinstance(t[3], tuple) else rawmode
            tiles.append(t._replace(args=args) if hasattr(t, "_replace") else (*t[:3], args))
        img.tile = tiles
        img.load()
        return np.asarray(img)


def _full_depth(img, path, rawmode: str):
    """A decoded 16-bit colour image (Pillow's 8-bit high bytes) → an 8-bit "LA", "RGB" or "RGBA" image whose
    samples are round(v / 257) of the full 16-bit values (decoded again for the low bytes)."""
    from PIL import Image

    kind, order = SIXTEEN_BIT_COLOUR.fullmatch(rawmode).groups()
    if kind == "LA":  # Pillow gives it as RGBA: decoded as 8-bit RGBA (32 bits a pixel too), the bytes in order
        b = _decode_as(path, "RGBA").astype(np.int64)
        v = b[:, :, 0::2] * 256 + b[:, :, 1::2] if order == "B" else b[:, :, 1::2] * 256 + b[:, :, 0::2]
    else:
        other = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}[order]
        low = _decode_as(path, f"{kind};16{other}")
        v = np.asarray(img).astype(np.int64) * 256 + low
    arr = sixteen_to_eight(v, str(path), img.mode, img.info.get("transparency"))
    img.close()
    return Image.fromarray(arr)


def image_channels(img) -> int:
    """1 for greyscale modes, 3 for every other (palette and CMYK included): the channels the image has once
    its alpha is handled."""
    if img.mode in GREY_MODES or img.mode.startswith("I;16") or sixteen_bit_colour(img) in ("LA;16B", "LA;16L"):
        return 1
    return 3


def sixteen_to_eight(v: np.ndarray, name: str, mode: str, transparency=None) -> np.ndarray:
    """16-bit samples [H, W] or [H, W, C] → uint8 [H, W, C'] by round(v / 257), exactly: (v + 128) // 257 (v / 257
    is never k + ½). A transparent colour `transparency` (an int or a tuple of 16-bit values, PNG tRNS) adds an
    alpha channel: 0 where every sample equals it, else 255."""
    v = np.asarray(v).astype(np.int64)
    v = v[:, :, None] if v.ndim == 2 else v
    if v.size and (v.min() < 0 or v.max() > 65535):
        raise DataError(f"{name}: {mode} pixels from {v.min()} to {v.max()}; only 8- or 16-bit images are supported")
    eight = ((v + 128) // 257).astype(np.uint8)
    if transparency is None or v.shape[2] not in (1, 3):
        return eight
    key = np.asarray(transparency, dtype=np.int64).reshape(-1)
    if key.size != v.shape[2]:
        return eight  # a malformed tRNS chunk: no transparent colour
    alpha = np.where((v == key).all(axis=2), 0, 255).astype(np.uint8)
    return np.concatenate([eight, alpha[:, :, None]], axis=2)


def _normalise_mode(img, name: str) -> np.ndarray:
    """[H, W, C] uint8 in "L", "LA", "RGB" or "RGBA" order (C = 1, 2, 3, 4), by the mode rules."""
    mode, transparent = img.mode, "transparency" in img.info
    if mode.startswith("I;16") or mode == "I":
        return sixteen_to_eight(np.asarray(img), name, mode, img.info.get("transparency"))
    if mode == "F":
        raise DataError(f"{name}: 32-bit float pixels (mode F) are not supported; convert the image to 8 or 16 bits")
    if mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if transparent else "RGB")
    elif mode in ("L", "RGB") and transparent:
        img = img.convert("LA" if mode == "L" else "RGBA")
    elif mode in ("La", "PA", "RGBa"):
        img = img.convert("LA" if mode == "La" else "RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _apply_alpha(arr: np.ndarray, alpha: str) -> np.ndarray:
    if arr.shape[2] not in (2, 4):
        return arr
    colour, a = arr[:, :, :-1], arr[:, :, -1:]
    if alpha == "drop":
        return np.ascontiguousarray(colour)
    c, a = colour.astype(np.int32), a.astype(np.int32)
    return ((2 * (c * a + 255 * (255 - a)) + 255) // 510).astype(np.uint8)  # round((c·a + 255·(255 − a)) / 255)


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    from PIL import Image

    if arr.shape[2] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    return np.asarray(Image.fromarray(arr, "RGB").convert("L"))[:, :, None]


def to_array(img, channels: int, alpha: str = "white", name: str = "image") -> np.ndarray:
    """A decoded Pillow image → [H, W, channels] uint8 by the mode, alpha and channel rules (module docstring)."""
    return _to_channels(_apply_alpha(_normalise_mode(img, name), alpha), channels)


MAX_ASPECT = 64  # the longest side of the resized image, in multiples of R (module docstring)


def center_crop_resize(img, resolution: int):
    """ADM's centre crop with area resize, as a Pillow image → Pillow image (module docstring)."""
    from PIL import Image

    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    if max(img.size) > MAX_ASPECT * min(img.size):  # the resize would make more than MAX_ASPECT·R² pixels
        keep = MAX_ASPECT * min(img.size)
        left, top = (max(img.width - keep, 0) // 2, max(img.height - keep, 0) // 2)
        img = img.crop((left, top, left + min(img.width, keep), top + min(img.height, keep)))
    scale = resolution / min(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    if size != img.size:
        img = img.resize(size, resample=Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    if (left, top) != (0, 0) or img.size != (resolution, resolution):
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def _resize_array(arr: np.ndarray, resolution: int) -> np.ndarray:
    """[H, W, C] uint8 (C = 1 or 3) → [R, R, C] by `center_crop_resize`."""
    from PIL import Image

    if arr.shape[:2] == (resolution, resolution):
        return arr
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, ARRAY_MODES[arr.shape[2]])
    out = np.asarray(center_crop_resize(img, resolution))
    return out[:, :, None] if out.ndim == 2 else out


def preprocess_image(path: Path, resolution: int, channels: int, alpha: str = "white") -> np.ndarray:
    """A file → [channels, R, R] uint8 by every rule of this module."""
    img = open_image(path)
    try:
        arr = to_array(img, channels, alpha, str(path))
    finally:
        img.close()
    return _resize_array(arr, resolution).transpose(2, 0, 1)


def preprocess_array(x: np.ndarray, resolution: int, channels: int, alpha: str = "white") -> np.ndarray:
    """One image held in memory, [C, H, W] uint8 with C = 1…4 → [channels, R, R] uint8 by the same rules."""
    arr = _to_channels(_apply_alpha(np.ascontiguousarray(x.transpose(1, 2, 0)), alpha), channels)
    return _resize_array(arr, resolution).transpose(2, 0, 1)
