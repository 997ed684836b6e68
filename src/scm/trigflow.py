"""TrigFlow (Lu & Song 2024, §3): the diffusion process every other module is written in.

    x_t = cos t · x0 + sin t · z,   z ~ N(0, σ_d² I),   t ∈ [0, π/2]                 (§3, eq. 2)

A network F_θ sees x_t/σ_d and t and predicts the velocity: dx_t/dt = σ_d·F (the PF-ODE, eq. 3).
From F follow the denoiser / consistency function f = cos t·x_t − sin t·σ_d·F (eq. 5, eq. 23) and the
first-order (DDIM) step of eq. 26. σ = σ_d·tan t links TrigFlow time to EDM's noise level (eq. 30).

Every function takes tensors of any float dtype, computes in at least float32 and returns the dtype of
its main tensor argument; `t` is a float tensor of shape [B] in radians. Only shapes are checked here (values
are checked where data enters: the objectives and samplers), so none of these functions waits for a GPU.
"""

from __future__ import annotations

import math

import torch

from scm._checks import check_float, check_positive, check_same_shape, check_t
from scm.precision import compute_dtype

__all__ = [
    "add_noise",
    "ddim_step",
    "denoise",
    "expand",
    "sample_t",
    "sct_velocity",
    "sigma_from_t",
    "t_from_sigma",
    "t_max_default",
]


def t_max_default(sigma_d: float = 0.5, sigma_max: float = 80.0) -> float:
    """The paper's sampling start time t_max = arctan(σ_max/σ_d) (App. G.2): arctan(160) ≈ 1.56454."""
    return math.atan(sigma_max / sigma_d)


def expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-example values [B] to [B, 1, ..., 1] so they broadcast against x."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def _cos_sin(t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tt = expand(t.to(compute_dtype(t, x)), x)
    return torch.cos(tt), torch.sin(tt)


def add_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos t·x0 + sin t·z (eq. 2). z must already have std σ_d."""
    check_same_shape(x0=x0, z=z)
    check_t(t, x0)
    c, s = _cos_sin(t, x0)
    return (c * x0 + s * z).to(x0.dtype)


def sct_velocity(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx_t/dt = cos t·z − sin t·x0: the one-sample PF-ODE velocity used by sCT (§2.2, Alg. 1)."""
    check_same_shape(x0=x0, z=z)
    check_t(t, x0)
    c, s = _cos_sin(t, x0)
    return (c * z - s * x0).to(x0.dtype)


def denoise(x_t: torch.Tensor, F: torch.Tensor, t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """f = cos t·x_t − sin t·σ_d·F: the consistency function (eq. 5) and the x0-prediction (eq. 23)."""
    check_same_shape(x_t=x_t, F=F)
    check_t(t, x_t)
    check_positive("sigma_d", sigma_d)
    c, s = _cos_sin(t, x_t)
    return (c * x_t - s * sigma_d * F).to(x_t.dtype)


def ddim_step(x_s: torch.Tensor, F: torch.Tensor, s: torch.Tensor, t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """First-order PF-ODE step from time s to time t (eq. 26):
    x_t = cos(s − t)·x_s − sin(s − t)·σ_d·F(x_s/σ_d, s). Exact when the x0- and noise-predictions stay
    constant along the step; well defined at s = π/2."""
    check_same_shape(x_s=x_s, F=F)
    check_t(s, x_s, name="s")
    check_t(t, x_s)
    h = expand((s - t).to(compute_dtype(s, x_s)), x_s)
    return (torch.cos(h) * x_s - torch.sin(h) * sigma_d * F).to(x_s.dtype)


def sigma_from_t(t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """EDM noise level σ = σ_d·tan t (eq. 30). Infinite at t = π/2."""
    check_float("t", t)
    check_positive("sigma_d", sigma_d)
    return (sigma_d * torch.tan(t.to(compute_dtype(t)))).to(t.dtype)


def t_from_sigma(sigma: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """Inverse of sigma_from_t: t = arctan(σ/σ_d); σ = ∞ maps to π/2."""
    check_float("sigma", sigma)
    check_positive("sigma_d", sigma_d)
    if bool((sigma < 0).any()):
        raise ValueError("sigma must be >= 0")
    return torch.atan(sigma.to(compute_dtype(sigma)) / sigma_d).to(sigma.dtype)


def sample_t(
    batch: int,
    P_mean: float,
    P_std: float,
    sigma_d: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The log-normal proposal (eq. 8, App. G): τ ~ N(P_mean, P_std²), t = arctan(e^τ/σ_d).

    Equivalently log(σ_d tan t) ~ N(P_mean, P_std²): EDM's log-normal σ proposal in TrigFlow time.
    Reproducible from `generator` (its device decides where τ is drawn; `device` where t is returned).
    """
    if not (isinstance(batch, int) and batch > 0):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not math.isfinite(P_mean):
        raise ValueError(f"P_mean must be finite, got {P_mean!r}")
    check_positive("P_std", P_std)
    check_positive("sigma_d", sigma_d)
    gen_device = generator.device if generator is not None else device
    tau = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float64)
    t = torch.atan(torch.exp(P_mean + P_std * tau) / sigma_d)
    return t.to(device=device if device is not None else t.device, dtype=dtype)
