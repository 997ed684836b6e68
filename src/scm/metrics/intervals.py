"""The spread of a quality figure over sample seeds: mean, sample standard deviation and the 95 % confidence
interval of the mean from Student's t (the figures of `scm ema sweep` and the fidelity reports)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SeedInterval", "seed_interval"]

# two-sided 95 % quantiles of Student's t by degrees of freedom; between two rows the smaller df's (wider, so
# conservative); beyond 30, the normal's 1.96
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


@dataclass(frozen=True)
class SeedInterval:
    mean: float
    std: float | None          # sample standard deviation (n − 1); None with one value
    low: float | None          # the 95 % interval of the mean; None with one value or a non-finite one
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with `df` degrees of freedom (table above)."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}")
    return _T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96


def seed_interval(values: list[float]) -> SeedInterval:
    """Mean, std and 95 % t-interval of the mean of one figure measured with independent sample seeds."""
    if not values:
        raise ValueError("seed_interval needs at least one value")
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return SeedInterval(mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t95(len(values) - 1) * std / math.sqrt(len(values))
    return SeedInterval(mean, std, mean - half, mean + half)
