"""Present other diffusion parameterizations as a TrigFlow network F (paper App. B.2).

Each adapter returns `fn(x_scaled, t, **cond) -> F` with x_scaled = x_t/σ_d, the calling convention of
every scm network. The time map, the input scaling and the output combination all live inside `fn`, so
forward-mode AD (`scm.tangents.jvp_tangent`) differentiates through them: a wrapped teacher can serve sCD
(which only needs F) and a wrapped network can even be fine-tuned as an sCM student.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scm._checks import check_choice, check_positive, check_t
from scm.precision import compute_dtype
from scm.trigflow import expand

__all__ = ["from_diffusers", "from_edm", "from_flow", "guided"]

TrigFlowFn = Callable[..., torch.Tensor]


def guided(fn: TrigFlowFn, uncond: dict | None = None) -> TrigFlowFn:
    """Classifier-free guidance: F_s = F_uncond + s·(F_cond − F_uncond) (paper §5.2, App. G.2; s = 1 is no guidance).

    Returns g(x_scaled, t, *, guidance, **cond) where `guidance` is a float or a tensor [B] (one scale per
    example, as sCD samples it). The unconditional call replaces entries of cond by `uncond`
    (default {"labels": None}: the network's unconditional mode).
    """
    uncond = {"labels": None} if uncond is None else dict(uncond)

    def g(x_scaled: torch.Tensor, t: torch.Tensor, *, guidance, **cond) -> torch.Tensor:
        F_c = fn(x_scaled, t, **cond)
        if isinstance(guidance, (int, float)) and guidance == 1:
            return F_c
        F_u = fn(x_scaled, t, **{**cond, **uncond})
        s = torch.as_tensor(guidance, dtype=F_c.dtype, device=F_c.device)
        if s.ndim == 1:
            s = expand(s, F_c)
        return F_u + s * (F_c - F_u)

    return g


def from_edm(D: Callable[..., torch.Tensor], sigma_d: float) -> TrigFlowFn:
    """Wrap an EDM denoiser D(x_σ, σ, **cond) ≈ E[x0 | x0 + σ·n = x_σ], n ~ N(0, I), as a TrigFlow F.

    With σ = σ_d·tan t and x_σ = x_t/cos t (eq. 30) the EDM process is TrigFlow's up to scale, and
    F = (cos t·x_t − D(x_σ, σ))/(σ_d·sin t) (invert f = cos t·x_t − sin t·σ_d·F, eq. 23).
    D receives σ as a tensor of shape [B]. Defined for 0 < t < π/2 only: σ = 0 and σ = ∞ have no
    EDM input, so t must stay inside the open interval (samplers start at t_max = arctan(80/σ_d); the training
    proposal never reaches either end). The wrapper does not read t's values (it runs inside training steps,
    where that would stall a GPU): at t = 0 or π/2 its output is not finite.
    """
    check_positive("sigma_d", sigma_d)

    def fn(x_scaled: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        check_t(t, x_scaled)
        x_t = sigma_d * x_scaled
        tt = expand(t.to(compute_dtype(t)), x_t)
        cos, sin = torch.cos(tt), torch.sin(tt)
        sigma = sigma_d * torch.tan(t)
        D_hat = D((x_t / cos).to(x_scaled.dtype), sigma, **cond)
        return ((cos * x_t - D_hat) / (sigma_d * sin)).to(x_scaled.dtype)

    return fn


def from_flow(v: Callable[..., torch.Tensor], sigma_d: float, *, time_scale: float = 1.0,
              data: str = "own") -> TrigFlowFn:
    """Wrap a rectified-flow velocity v(x_s, s·time_scale, **cond) ≈ E[ε − y | x_s] as a TrigFlow F.

    The flow runs on its data y: x_s = (1 − s)·y + s·ε, ε ~ N(0, I), s ∈ [0, 1], where y = x0 (data="own", the
    default: scm's data is the flow model's own, σ_d its std) or y = x0/σ_d (data="unit": Sana-Sprint's
    convention, the flow model's data at unit std; Chen et al. 2025, Prop. 3.1). With y = x0/k, x_t = a·y + b·ε
    for a = k·cos t, b = σ_d·sin t, so matching signal-to-noise ratios gives
        s = b/(a + b),   x_s = x_t/(a + b),   F = cos t·(x_s + (1 − s)·v) − (k·sin t/σ_d)·(x_s − s·v),
    the TrigFlow target E[cos t·ε − sin t·x0/σ_d | x_t] (eq. 3–4) from ε̂ = x_s + (1 − s)·v and ŷ = x_s − s·v.
    For data="unit" this is Sana-Sprint's F = [(cos t − sin t)·x_t/σ_d + v]/(sin t + cos t). Defined on the
    closed interval [0, π/2]. `time_scale` multiplies the time fed to v (e.g. 1000 for models trained on
    s·1000; beware that a large scale amplifies ∂F/∂t, the instability of paper §4.1). Same conventions as
    `scm.diffusers.from_diffusers` (`scm.diffusers.convert`), which wraps diffusers' flow-matching models.
    """
    check_positive("sigma_d", sigma_d)
    check_positive("time_scale", time_scale)
    check_choice("data", data, ("own", "unit"))
    k = 1.0 if data == "own" else float(sigma_d)

    def fn(x_scaled: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        check_t(t, x_scaled)
        work = compute_dtype(t, x_scaled)
        cos, sin = torch.cos(t.to(work)), torch.sin(t.to(work))
        a, b = k * cos, sigma_d * sin
        s = b / (a + b)
        x_s = sigma_d * x_scaled.to(work) / expand(a + b, x_scaled)
        v_hat = v(x_s.to(x_scaled.dtype), (s * time_scale).to(t.dtype), **cond).to(work)
        ss = expand(s, x_scaled)
        eps, y = x_s + (1 - ss) * v_hat, x_s - ss * v_hat
        F = expand(cos, x_scaled) * eps - (k / sigma_d) * expand(sin, x_scaled) * y
        return F.to(x_scaled.dtype)

    return fn


def from_diffusers(model, scheduler, *, sigma_d: float | None = None, data: str = "own", **kwargs) -> TrigFlowFn:
    """A diffusers network and its training scheduler as a TrigFlow F (VP/DDPM ε/v/x0, EDM, rectified flow); see
    `scm.diffusers.from_diffusers`. Needs the optional extra scm[latent] (diffusers) only to load models."""
    from scm.diffusers.teacher import from_diffusers as wrap

    return wrap(model, scheduler, sigma_d=sigma_d, data=data, **kwargs)
