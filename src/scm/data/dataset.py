"""The data-set interface: what training, evaluation and preparation need of a data set, as a `typing.Protocol`
that every kind of data set satisfies (`ImageData` in memory, `PreparedData` on disk; tests check both).

An item is a float tensor in the model's space of shape `shape` (images: (C, H, W), not necessarily square;
the same interface carries (C, T, H, W) video or (C, L) audio: `modality` says which, `media` their frame or
sample rate). Its conditioning is data too: `batch` returns the
items and a dict of conditioning tensors ({"labels": int64 [B]} for a labelled set; for a set with prompt
embeddings "text" float32 [B, T, D], "text_mask" bool [B, T] and, where the encoder has one, "text_pooled" float32
[B, P]; {} otherwise), and `conditions` names what that dict holds; a run's `scm.conditioning.Conditioning` picks
what its network takes.

Captions: an item may have several (`captions`, one list of ≥ 1 per item). A set with prompt embeddings (a
prepared set made by `scm data encode --text-encoder`: `text` describes them) gives each item one caption's
embedding per batch: drawn uniformly among its captions with the CPU generator `choice` (training passes one
seeded per step and slot: `scm.train.batches`), or its first caption when `choice` is None (evaluation).
`caption_of` tells the caption text the same draw picks, and `null_text` is the empty prompt's embedding (the
unconditional input of classifier-free guidance). Captions alone (a captioned folder in memory) are text: they
are never encoded on the fly; training on prompts needs an encoded set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Dataset", "fingerprint"]

FINGERPRINT_ITEMS = 16  # items read (evenly spaced, the first and the last among them) by `fingerprint`


@runtime_checkable
class Dataset(Protocol):
    """A data set of N items (module docstring). `labels` are the class indices of all items (int64 [N], or None),
    `class_names` their names where known; `value_range` says how stored values map to the model's space
    ("uint8": 0…255 → [-1, 1], "unit": [0, 1] → [-1, 1], "raw": as they are); `latent` describes the VAE and
    normalisation of a set of latents (None: pixels); `captions` are each item's captions (lists of strings), or
    None."""

    source: str
    labels: torch.Tensor | None
    class_names: list[str] | None
    value_range: str
    captions: Sequence[list[str]] | None

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]:
        """One item's shape in the model's space, channels first."""
        ...

    @property
    def channels(self) -> int: ...

    @property
    def modality(self) -> str:
        """"image" (items (C, H, W)), "video" ((C, T, H, W)) or "audio" ((C, L)): `scm.data.modality`."""
        ...

    @property
    def media(self) -> dict | None:
        """The items' timing: video {"fps", "frames", "stride"}, audio {"sample_rate"}; None for images."""
        ...

    @property
    def num_classes(self) -> int: ...

    @property
    def conditions(self) -> tuple[str, ...]:
        """The names of the conditioning tensors `batch` returns."""
        ...

    @property
    def latent(self) -> dict | None: ...

    @property
    def text(self) -> dict | None:
        """How the captions were embedded (encoder, max_tokens, width, pooled_width, captions, dtype), or None."""
        ...

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Stored values → the model's space (float32)."""
        ...

    def batch(self, index: torch.Tensor, device=None, choice: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Items `index` in the model's space on `device`, and their conditioning tensors; `choice` draws each
        item's caption (module docstring)."""
        ...

    def caption_of(self, index, choice: torch.Generator | None = None) -> list[str]:
        """The caption text of each item of `index` that `batch` with a generator in the same state (or None)
        takes; DataError for a set without captions."""
        ...

    def null_text(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embedding (the `conditions` of prompts, each [1, …]); DataError without embeddings."""
        ...

    def subset(self, start: int, stop: int | None = None, source: str | None = None) -> Dataset:
        """Items start … stop − 1."""
        ...

    def describe(self) -> str:
        """One line for a person: source, size, shape, classes, value range."""
        ...


def fingerprint(data: Dataset, items: int = FINGERPRINT_ITEMS) -> str:
    """A SHA-256 (hex) of what training would read from `data`: its size, item shape and conditioning names, every
    label, and `items` evenly spaced items (the first and the last among them) with their conditioning as `batch`
    gives them (the first caption's embedding). Two copies of one data set agree; sets that differ in size, shape,
    labels or any of those items do not. A sample, not a digest of every item: reading a whole set larger than
    memory would cost an epoch. Memory: one item at a time."""
    h = hashlib.sha256(repr((len(data), tuple(data.shape), tuple(data.conditions))).encode())
    if data.labels is not None:
        h.update(data.labels.to(torch.int64).contiguous().numpy().tobytes())
    n = len(data)
    for i in sorted({round(k * (n - 1) / max(items - 1, 1)) for k in range(min(items, n))}):
        x, cond = data.batch(torch.tensor([i]))
        for name, t in [("x", x), *sorted(cond.items())]:
            h.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
