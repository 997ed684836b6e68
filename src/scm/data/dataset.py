"""The data-set interface: what training, evaluation and preparation need of a data set, as a `typing.Protocol`
that every kind of data set satisfies (`ImageData` in memory, `PreparedData` on disk; tests check both).

An item is a float tensor in the model's space of shape `shape` (images: (C, H, W), not necessarily square;
the same interface carries (C, T, H, W) video or (C, L) audio). Its conditioning is data too: `batch` returns the
items and a dict of conditioning tensors ({"labels": int64 [B]} for a labelled set, {} otherwise), and
`conditions` names what that dict holds; a run's `scm.conditioning.Conditioning` picks what its network takes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Dataset"]


@runtime_checkable
class Dataset(Protocol):
    """A data set of N items (module docstring). `labels` are the class indices of all items (int64 [N], or None),
    `class_names` their names where known; `value_range` says how stored values map to the model's space
    ("uint8": 0…255 → [-1, 1], "unit": [0, 1] → [-1, 1], "raw": as they are); `latent` describes the VAE and
    normalisation of a set of latents (None: pixels)."""

    source: str
    labels: torch.Tensor | None
    class_names: list[str] | None
    value_range: str

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]:
        """One item's shape in the model's space, channels first."""
        ...

    @property
    def channels(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def conditions(self) -> tuple[str, ...]:
        """The names of the conditioning tensors `batch` returns."""
        ...

    @property
    def latent(self) -> dict | None: ...

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Stored values → the model's space (float32)."""
        ...

    def batch(self, index: torch.Tensor, device=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Items `index` in the model's space on `device`, and their conditioning tensors."""
        ...

    def subset(self, start: int, stop: int | None = None, source: str | None = None) -> Dataset:
        """Items start … stop − 1."""
        ...

    def describe(self) -> str:
        """One line for a person: source, size, shape, classes, value range."""
        ...
