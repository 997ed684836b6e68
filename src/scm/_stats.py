"""Streaming moments: one pairwise merge for the per-channel statistics of latents and the feature covariance of
reference statistics."""

from __future__ import annotations

__all__ = ["merge_moments"]


def merge_moments(a: tuple | None, b: tuple) -> tuple:
    """Two (count, mean, scatter) summaries → the summary of their union (Chan, Golub & LeVeque 1979, the pairwise
    update: stable, exact in exact arithmetic). The scatter is the matrix Σ(x − mean)(x − mean)ᵀ when it has two
    dims, its diagonal Σ(x − mean)² when it has one; NumPy arrays or torch tensors. `a` None: nothing yet."""
    if a is None:
        return b
    (na, ma, sa), (nb, mb, sb) = a, b
    n, d = na + nb, mb - ma
    dd = d[:, None] * d[None, :] if sa.ndim == 2 else d * d
    return n, ma + d * (nb / n), sa + sb + dd * (na * nb / n)
