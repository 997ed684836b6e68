"""Input validation shared by the maths modules: clear ValueErrors instead of silent broadcasting."""

from __future__ import annotations

import math

import torch

HALF_PI = math.pi / 2
# float32 rounds π/2 up to 1.5707964 (2.4e-8 above π/2); allow that much so that t = π/2 given in
# float32 (or bf16, whose π/2 is 1.5703125 and thus below) is accepted.
_T_TOL = 1e-6


def check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_t(t: torch.Tensor, x: torch.Tensor | None = None, *, name: str = "t") -> None:
    """t must be a float tensor of shape [B] (B = x.shape[0]) with values in [0, π/2]."""
    check_float(name, t)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape [B] (one time per example), got shape {tuple(t.shape)}")
    if x is not None and (x.ndim < 1 or x.shape[0] != t.shape[0]):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}: "
            f"expected {name} of shape [{x.shape[0] if x.ndim else '?'}] (one time per example)"
        )
    bad = torch.isnan(t) | (t < 0) | (t > HALF_PI + _T_TOL)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must lie in [0, π/2] (radians); {name}[{i}] = {float(t[i])!r}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """All named tensors must have the same shape."""
    items = list(tensors.items())
    name0, x0 = items[0]
    for name, x in items:
        check_float(name, x)
        if x.shape != x0.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {name0} has shape {tuple(x0.shape)}")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
