"""Distances between two sets of feature vectors: Fréchet distance, KID-style MMD, precision and recall.

Pure torch in float64 (no SciPy): the Fréchet distance's matrix square root goes through symmetric
eigendecompositions, tr((Σ1^½ Σ2 Σ1^½)^½), which is exact for PSD covariances and stable at any rank.
"""

from __future__ import annotations

import torch

__all__ = ["feature_stats", "frechet_distance", "kernel_distance", "precision_recall"]


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    f = features.double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape [N, D], got {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1^½ Σ2 Σ1^½)^½) (Fréchet/Wasserstein-2 distance of two Gaussians)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics do not match: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    r1 = _sqrt_psd(s1)
    covmean_trace = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * covmean_trace)


def kernel_distance(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 10, subset_size: int = 1000,
                    generator: torch.Generator | None = None) -> float:
    """KID: the unbiased MMD² with the cubic polynomial kernel (x·y/D + 1)³, averaged over random subsets."""
    f1, f2 = f1.double(), f2.double()
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    total = 0.0
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=generator)[:m]]
        y = f2[torch.randperm(len(f2), generator=generator)[:m]]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        total += float((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())
    return total / subsets


def _radii(f: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # k-th neighbour, excluding the point itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of generated samples inside the
    real data's k-NN manifold, and of real samples inside the generated one."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = torch.cdist(fake, real)  # [n_fake, n_real]
    precision = (d <= r_real[None, :]).any(dim=1).double().mean()
    recall = (r_fake[None, :] >= d.T).any(dim=1).double().mean()
    return float(precision), float(recall)

