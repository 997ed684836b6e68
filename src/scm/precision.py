"""Floating-point precision in one place: the compute dtype of sensitive maths and the names of precisions.

Sensitive maths (time embeddings, the sCM target, normalizations, ODE steps) runs in at least float32 and in
float64 when an input already is; `compute_dtype` says which. `PRECISIONS` maps the names used by
configurations ("fp32", "bf16", "fp16") to dtypes.
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "compute_dtype", "precision_dtype", "to_compute"]

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(*xs: torch.Tensor | torch.dtype) -> torch.dtype:
    """float32, or the widest float dtype among `xs` if wider (float64)."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x if isinstance(x, torch.dtype) else x.dtype)
    return dtype


def to_compute(x: torch.Tensor) -> torch.Tensor:
    """x in its compute dtype (float32, or float64 if it already is)."""
    return x.to(compute_dtype(x))


def precision_dtype(name: str | None) -> torch.dtype | None:
    """"fp32" / "bf16" / "fp16" → the dtype; None → None (keep the caller's state)."""
    if name is None:
        return None
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)} or None, got {name!r}")
    return PRECISIONS[name]
