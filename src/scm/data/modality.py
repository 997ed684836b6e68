"""What kind of items a data set holds: images (C, H, W), video clips (C, T, H, W) or audio clips (C, L), and
the timing that goes with them.

The modality follows from an item's number of dimensions (channels first), so an array needs no label to be
read; a prepared set records it anyway (meta.json "modality", with "fps", "frames" and "stride" for video and
"sample_rate" for audio: `media_of`), and a set written before video and audio existed has no "modality" and is
read as images. Rates describe the stored samples: a video's `fps` is the rate its frames were taken at (a
nominal DEFAULT_FPS when the source has none, e.g. Moving MNIST or folders of frames), an audio clip's
`sample_rate` the rate of its samples.
"""

from __future__ import annotations

import math

from scm.errors import DataError

__all__ = ["DEFAULT_FPS", "MODALITIES", "check_media", "describe_items", "media_of", "modality_of"]

MODALITIES = {"image": 3, "video": 4, "audio": 2}  # the dimensions of one item (channels first)
DEFAULT_FPS = 10.0  # frames per second recorded for video whose source has no rate (a common rate for GIF clips)
MEDIA_KEYS = {"image": (), "video": ("fps", "frames", "stride"), "audio": ("sample_rate",)}


def modality_of(shape: tuple[int, ...], source: str = "data") -> str:
    """"image", "video" or "audio" for an item shape (C, H, W), (C, T, H, W) or (C, L); DataError otherwise."""
    for name, ndim in MODALITIES.items():
        if len(shape) == ndim:
            return name
    raise DataError(f"{source}: items of shape {tuple(shape)}; expected (C, H, W) images, (C, T, H, W) video or "
                    "(C, L) audio")


def media_of(meta: dict) -> dict:
    """The timing fields of a prepared set's metadata for its modality ({} for images)."""
    return {k: meta[k] for k in MEDIA_KEYS[meta.get("modality", "image")] if k in meta}


def _positive(value, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value > 0 and math.isfinite(value) and (not integer or float(value).is_integer())


def check_media(modality: str, shape: tuple[int, ...], media: dict, source: str) -> dict:
    """`media` checked for items of `modality` and `shape` (DataError naming `source` and the field): video
    needs fps > 0, frames = T and an integer stride ≥ 1; audio an integer sample_rate > 0."""
    if modality not in MODALITIES:
        raise DataError(f"{source}: modality {modality!r}; must be one of {', '.join(MODALITIES)}")
    if len(shape) != MODALITIES[modality]:
        raise DataError(f"{source}: {modality} items need {MODALITIES[modality]} dimensions (channels first), "
                        f"the shape is {list(shape)}")
    for key in MEDIA_KEYS[modality]:
        if key not in media:
            raise DataError(f"{source}: {modality} without {key!r}")
        if not _positive(media[key], integer=key != "fps"):
            kind = "number" if key == "fps" else "integer"
            raise DataError(f"{source}: {key}={media[key]!r}; must be a positive {kind}")
    if modality == "video" and int(media["frames"]) != shape[1]:
        raise DataError(f"{source}: frames={media['frames']} but the clips hold {shape[1]} frames")
    return {k: media[k] for k in MEDIA_KEYS[modality]}


def describe_items(n: int, shape: tuple[int, ...], media: dict | None, what: str | None = None) -> str:
    """"N images, H×W, C channel(s)" (as image sets always read), "N video clips of T frames, H×W, C channel(s),
    F fps (stride S)" or "N audio clips of L samples (D s at R Hz), C channel(s)"."""
    media = media or {}
    modality = modality_of(shape)
    if modality == "image":
        return f"{n} {what or 'images'}, {'×'.join(map(str, shape[1:]))}, {shape[0]} channel(s)"
    if modality == "video":
        rate = f", {media['fps']:g} fps" if "fps" in media else ""
        stride = f" (clips start every {media['stride']} frames)" if "stride" in media else ""
        return (f"{n} video clips{' of ' + what if what else ''} of {shape[1]} frames, {shape[2]}×{shape[3]}, "
                f"{shape[0]} channel(s){rate}{stride}")
    sr = media.get("sample_rate")
    length = f" ({shape[1] / sr:.3g} s at {sr} Hz)" if sr else ""
    return f"{n} audio clips{' of ' + what if what else ''} of {shape[1]} samples{length}, {shape[0]} channel(s)"
