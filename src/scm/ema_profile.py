"""Post-hoc EMA: the maths of EDM2 (Karras et al. 2024, §3.2 and App. C.3), in numpy float64, no tensors.

A power-function EMA with exponent γ, read at time t (in training images), is an average of the weight trajectory
θ(τ), 0 ≤ τ ≤ t, under the normalised profile

    p_{γ,t}(τ) = (γ + 1) τ^γ / t^(γ+1)   on [0, t]   (0 elsewhere; ∫ p = 1),

whose relative std σ_rel = sqrt((γ + 1)/((γ + 2)²(γ + 3))) (EDM2 eq. 3). A snapshot i is such an average with
(γ_i, t_i). To get the average of another (γ_r, t_r) after training, EDM2 (App. C.3) writes it as a combination
Σ_i x_i·snapshot_i and picks x by least squares on the profiles in L²([0, ∞)):

    minimise ‖Σ_i x_i p_i − p_r‖²  ⇔  A x = b,   A_ij = ⟨p_i, p_j⟩,   b_i = ⟨p_i, p_r⟩,

with the inner products in closed form (`profile_dot`). The combined weights are then Σ_i x_i θ̂_i.

**The discrete EMA is exactly this model.** `scm.train.ema.PowerEMA` updates after step k (t_k = kΔ images, batch
Δ) with β_k = (1 − 1/k)^(γ+1) and copies θ_1 at k = 1 (β_1 = 0). Unrolled, the weight of θ_j in the EMA after
step K is (1 − β_j)·Π_{i=j+1..K} β_i = (j^(γ+1) − (j − 1)^(γ+1)) / K^(γ+1) = ∫_{(j−1)Δ}^{jΔ} p_{γ,KΔ}(τ) dτ: the
continuous profile applied to the piecewise-constant trajectory θ(τ) = θ_j on ((j − 1)Δ, jΔ]. So a snapshot IS
⟨p_i, θ⟩ for that θ, with no approximation; a combination whose profile equals p_r equals the target EMA exactly
(`tests/test_posthoc_ema.py` checks this on the unrolled discrete weights). What remains is the least-squares
residual, reported by `solve_coefficients` as ‖Σ x_i p_i − p_r‖ / ‖p_r‖. (A step skipped for a non-finite loss
does not update the EMA while t advances: its interval's weight is spread over the earlier ones. Such steps are rare and
stop a run after `max_bad_steps`; this is the model's only departure from PowerEMA.)

Inner products are computed as ratios (m/t)^(γ+1), never t^γ alone, so millions of images and γ in the hundreds
(σ_rel ≈ 0.01 ⇒ γ ≈ 100) do not overflow.
"""

from __future__ import annotations

import numpy as np

from scm.defaults import MAX_ERROR  # the largest relative L² error of a reconstructed profile accepted

__all__ = ["MAX_ERROR", "SIGMA_REL_MAX", "exp_to_std", "profile_dot", "solve_coefficients", "std_to_exp"]

# The largest σ_rel a reconstruction may ask for (as `ema.stds`): γ = 0.14. At γ = 0 (σ_rel = 0.2887) the profile
# is the plain average of the whole run; below it τ^γ grows without bound at τ → 0 and the γ ↔ σ_rel map turns back
# (σ_rel peaks at 0.30 for γ ≈ −0.4). Whether a snapshot set represents a σ_rel below that is for the residual of
# `solve_coefficients` to say: narrow profiles (small σ_rel, large γ) need snapshots closer together than their
# width, ~σ_rel·t.
SIGMA_REL_MAX = 0.28


def std_to_exp(std: float) -> float:
    """γ of the power-function EMA whose relative std is σ_rel = std: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0 (EDM2 eq. 3 solved for γ)."""
    s2 = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def exp_to_std(gamma: float) -> float:
    """σ_rel of the power-function EMA with exponent γ (EDM2 eq. 3)."""
    g = float(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """⟨p_{γa,ta}, p_{γb,tb}⟩ = ∫_0^m (γa+1)(γb+1) τ^(γa+γb) / (ta^(γa+1) tb^(γb+1)) dτ, m = min(ta, tb)
    = (γa+1)(γb+1)/(γa+γb+1) · (m/ta)^(γa+1) · (m/tb)^(γb+1) / m   (EDM2 App. C.3; broadcasts)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m


def solve_coefficients(t_i, gamma_i, t_r: float, gamma_r):
    """The coefficients x of the snapshots (γ_i, t_i) whose combination best approximates the profile (γ_r, t_r)
    in L² (EDM2 App. C.3: the normal equations A x = b, solved by least squares, so that a rank-deficient A,
    e.g. a snapshot listed twice, still gives the minimum-norm solution), and the relative residual
    ‖Σ_i x_i p_i − p_r‖ / ‖p_r‖ (0: the target is reproduced exactly). `gamma_r` may be an array of targets:
    then x is [len(t_i), len(gamma_r)] and the residuals an array.

    Times are rescaled by t_r first (the profiles are scale-invariant: p_{γ,ct}(cτ) = p_{γ,t}(τ)/c), so A and b
    are O(1) whatever the units."""
    t_i = np.asarray(t_i, dtype=np.float64) / float(t_r)
    gamma_i = np.asarray(gamma_i, dtype=np.float64)
    gamma_r = np.asarray(gamma_r, dtype=np.float64)
    if t_i.ndim != 1 or t_i.shape != gamma_i.shape or len(t_i) == 0:
        raise ValueError("need one or more snapshots, each with a time and an exponent")
    if not (np.all(t_i > 0) and np.all(gamma_i > -0.5) and float(t_r) > 0 and np.all(gamma_r > -0.5)):
        raise ValueError("times must be > 0 and exponents > -1/2 (square-integrable profiles)")
    g_r = gamma_r.reshape(1, -1)
    A = profile_dot(t_i[:, None], gamma_i[:, None], t_i[None, :], gamma_i[None, :])
    b = profile_dot(t_i[:, None], gamma_i[:, None], 1.0, g_r)
    # rcond: singular values below 1e-13 of the largest are float64 round-off in A (its entries are O(1))
    x = np.linalg.lstsq(A, b, rcond=1e-13)[0]
    target = profile_dot(1.0, g_r, 1.0, g_r)[0]
    # ‖Σ x_i p_i − p_r‖² expanded (its cancellation puts a floor of ~1e-7 under the relative residual)
    err2 = np.einsum("im,ij,jm->m", x, A, x) - 2 * np.einsum("im,im->m", x, b) + target
    err = np.sqrt(np.maximum(err2, 0.0) / target)
    if gamma_r.ndim == 0:
        return x[:, 0], float(err[0])
    return x, err
