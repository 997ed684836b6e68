"""Closed-form oracles: data x0 ~ N(μ, s²) independently per dimension.

With z ~ N(0, σ_d²) the TrigFlow marginal is x_t ~ N(m_t, v_t²), m_t = cos t·μ, v_t² = cos²t·s² + sin²t·σ_d².
Gaussian conditioning gives every quantity the library approximates:
- the ideal diffusion network  F*(x_t/σ_d, t) = E[cos t·z − sin t·x0 | x_t]/σ_d,
- the PF-ODE flow, which keeps the standardized coordinate (x_t − m_t)/v_t constant, hence the exact
  consistency function f*(x_t, t) = μ + s·(x_t − m_t)/v_t and its network F_cm = (cos t·x_t − f*)/(σ_d sin t),
- the EDM denoiser E[x0 | x0 + σn] and the rectified-flow velocity E[ε − y | (1−s)y + sε], y = x0/σ_d.
Everything is written with torch ops so forward-mode AD differentiates it.
"""

from __future__ import annotations

import torch


def _col(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class Gaussian:
    def __init__(self, mu, s, sigma_d: float = 0.5, dtype=torch.float64):
        self.mu = torch.as_tensor(mu, dtype=dtype)
        self.s = torch.as_tensor(s, dtype=dtype)
        self.sigma_d = sigma_d
        self.dim = self.mu.numel()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        e = torch.randn(n, self.dim, generator=generator, dtype=self.mu.dtype)
        return self.mu + self.s * e

    def _moments(self, t, x):
        tt = _col(t, x).to(x.dtype)
        c, si = torch.cos(tt), torch.sin(tt)
        m = c * self.mu
        v2 = c * c * self.s**2 + si * si * self.sigma_d**2
        return c, si, m, v2

    def F_star(self, x_scaled: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        """E[cos t·z − sin t·x0 | x_t]/σ_d: the exact TrigFlow diffusion network (the ideal teacher)."""
        sd = self.sigma_d
        x = sd * x_scaled
        c, si, m, v2 = self._moments(t, x)
        return (si * c * (sd**2 - self.s**2) / v2 * (x - m) - si * self.mu) / sd

    def f_star(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact consistency function: where the PF-ODE through (x_t, t) lands at t = 0."""
        _, _, m, v2 = self._moments(t, x_t)
        return self.mu + self.s * (x_t - m) / torch.sqrt(v2)

    def F_cm(self, x_scaled: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        """The network of the exact consistency model: f* = cos t·x_t − sin t·σ_d·F_cm (needs t > 0)."""
        sd = self.sigma_d
        x = sd * x_scaled
        c, si, _, _ = self._moments(t, x)
        return (c * x - self.f_star(x, t)) / (sd * si)

    def edm_D(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + σ·n = x_σ], n ~ N(0, I)."""
        sig2 = _col(sigma, x_sigma).to(x_sigma.dtype) ** 2
        return self.mu + self.s**2 / (self.s**2 + sig2) * (x_sigma - self.mu)

    def flow_v(self, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """E[ε − y | x_s] for x_s = (1 − s)·y + s·ε, y = x0/σ_d ~ N(μ/σ_d, s²/σ_d²), ε ~ N(0, I)."""
        a, b2 = self.mu / self.sigma_d, (self.s / self.sigma_d) ** 2
        ss = _col(s, x_s).to(x_s.dtype)
        V = (1 - ss) ** 2 * b2 + ss**2
        r = x_s - (1 - ss) * a
        return ss / V * r - (a + (1 - ss) * b2 / V * r)

    def eps_y(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, k: float = 1.0):
        """(E[ε | x], E[y | x]) for x = α·y + σ·ε with y = x0/k ~ N(μ/k, s²/k²), ε ~ N(0, I): the ideal noise and data
        predictions of a diffusion model of y at that noise level (α, σ: [B])."""
        my, vy = self.mu / k, (self.s / k) ** 2
        a, sg = _col(alpha, x).to(x.dtype), _col(sigma, x).to(x.dtype)
        r = (x - a * my) / (a * a * vy + sg * sg)
        return sg * r, my + a * vy * r

    def posterior_x0(self, x_t: torch.Tensor, t: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        """n samples of x0 | x_t for one x_t of shape [1, D]: returns [n, D]."""
        c, si, m, v2 = self._moments(t, x_t)
        mean = self.mu + c * self.s**2 / v2 * (x_t - m)
        var = self.s**2 * si * si * self.sigma_d**2 / v2
        e = torch.randn(n, self.dim, generator=generator, dtype=x_t.dtype)
        return mean + torch.sqrt(var) * e
