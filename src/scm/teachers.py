"""Present other diffusion parameterizations as a TrigFlow network F (paper App. B.2).

Each adapter returns `fn(x_scaled, t, **cond) -> F` with x_scaled = x_t/σ_d, the calling convention of
every scm network. The time map, the input scaling and the output combination all live inside `fn`, so
forward-mode AD (`scm.tangents.jvp_tangent`) differentiates through them: a wrapped teacher can serve sCD
(which only needs F) and a wrapped network can even be fine-tuned as an sCM student.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scm._checks import check_positive, check_t
from scm.precision import compute_dtype
from scm.trigflow import expand

__all__ = ["from_edm", "from_flow", "guided"]

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


def from_flow(v: Callable[..., torch.Tensor], sigma_d: float, *, time_scale: float = 1.0) -> TrigFlowFn:
    """Wrap a rectified-flow velocity v(x_s, s·time_scale, **cond) ≈ E[ε − y | x_s] as a TrigFlow F.

    The flow runs on data at unit std: x_s = (1 − s)·y + s·ε with y = x0/σ_d, ε ~ N(0, I), s ∈ [0, 1].
    Matching signal-to-noise ratios gives s = sin t/(sin t + cos t) and x_s = (x_t/σ_d)/(sin t + cos t);
    the TrigFlow target E[cos t·ε − sin t·y | x_t] then follows from v as
        F = [(1 − 2s)·x_s + (1 − 2s + 2s²)·v] / sqrt(s² + (1 − s)²)          (Sana-Sprint, Chen et al. 2025, Prop. 3.1)
          = [(cos t − sin t)·x_t/σ_d + v] / (sin t + cos t)                   (same, simplified).
    Defined on the closed interval [0, π/2]. `time_scale` multiplies the time fed to v (e.g. 1000 for
    models trained on s·1000; beware that a large scale amplifies ∂F/∂t, the instability of paper §4.1).
    """
    check_positive("sigma_d", sigma_d)
    check_positive("time_scale", time_scale)

    def fn(x_scaled: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        check_t(t, x_scaled)
        t_work = t.to(compute_dtype(t))
        denom = torch.sin(t_work) + torch.cos(t_work)
        s = torch.sin(t_work) / denom
        tt = expand(t_work, x_scaled)
        den = expand(denom, x_scaled)
        x_s = x_scaled / den
        v_hat = v(x_s.to(x_scaled.dtype), (s * time_scale).to(t.dtype), **cond)
        return (((torch.cos(tt) - torch.sin(tt)) * x_scaled + v_hat) / den).to(x_scaled.dtype)

    return fn
