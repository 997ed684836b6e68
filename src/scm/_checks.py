"""Input validation shared by the maths modules: clear errors instead of silent broadcasting.

Two kinds of checks, kept apart so that the hot path never waits for the device:
- shape and dtype checks (`check_t`, `check_same_shape`, `check_float`) read only metadata: free anywhere;
- value checks (`checked_t`) read tensor values, which on a GPU is a host-device synchronisation: they run once,
  where data enters (the objectives when a caller passes its own `t`, the samplers, data loaders, the CLI).
"""

from __future__ import annotations

import math

import torch

from scm.errors import InvalidSetting

HALF_PI = math.pi / 2
# Times a little above π/2 are accepted and clamped to π/2: float32 rounds π/2 up to 1.5707964, and diffusers'
# SCMScheduler stores t_max = π/2 as 1.57080 (3.7e-6 above).
T_TOL = 1e-5


def check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_t(t: torch.Tensor, x: torch.Tensor | None = None, *, name: str = "t") -> None:
    """t must be a float tensor of shape [B] (B = x.shape[0]). Shapes only: no device synchronisation."""
    check_float(name, t)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape [B] (one time per example), got shape {tuple(t.shape)}")
    if x is not None and (x.ndim < 1 or x.shape[0] != t.shape[0]):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}: "
            f"expected {name} of shape [{x.shape[0] if x.ndim else '?'}] (one time per example)"
        )


def checked_t(t: torch.Tensor, x: torch.Tensor | None = None, *, name: str = "t") -> torch.Tensor:
    """Shape checks, then values in [0, π/2 + 1e-5] (clamped to π/2). Reads values: use where data enters."""
    check_t(t, x, name=name)
    bad = torch.isnan(t) | (t < 0) | (t > HALF_PI + T_TOL)
    if bool(bad.any()):  # a host-device synchronisation, once per entry
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must lie in [0, π/2] (radians); {name}[{i}] = {float(t[i])!r}")
    return t.clamp(max=HALF_PI)


def check_same_shape(**tensors: torch.Tensor) -> None:
    """All named tensors must have the same shape."""
    items = list(tensors.items())
    name0, x0 = items[0]
    for name, x in items:
        check_float(name, x)
        if x.shape != x0.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {name0} has shape {tuple(x0.shape)}")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise InvalidSetting(name, value, "must be a finite positive number")


def check_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise InvalidSetting(name, value, "must be a finite number")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InvalidSetting(name, value, f"must be one of {', '.join(map(repr, choices))}")


def sizes(resolution, name: str = "resolution", ndim: int = 2) -> tuple[int, ...]:
    """An item's sizes after its channels, from a resolution setting: an int R is a square R×R (images), a sequence
    gives each size ((H, W) = (24, 32)). InvalidSetting unless there are `ndim` positive integers."""
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        resolution = (resolution,) * ndim
    try:
        values = tuple(resolution)
    except TypeError:
        values = ()
    if len(values) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise InvalidSetting(name, resolution, f"must be a positive integer or {ndim} of them (one per axis)")
    return values


def describe_shape(shape: tuple[int, ...]) -> str:
    """An item shape (C, *sizes) as people write it: (1, 24, 32) → "24×32×1"."""
    return "×".join(str(s) for s in (*shape[1:], shape[0]))
