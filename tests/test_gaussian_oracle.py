"""The closed-form Gaussian oracle (tests/oracle.py) against the library's maths, samplers and losses."""

import math

import pytest
import torch
from torch import nn

from scm.objectives import ConsistencyLoss, DiffusionLoss, scm_target
from scm.sampling import consistency_sample, consistency_times, ode_sample, ode_times
from scm.tangents import jvp_tangent
from scm.trigflow import add_noise, sct_velocity, t_max_default

from oracle import Gaussian

SD = 0.5
G = Gaussian(mu=[0.3, -0.2, 0.1, 0.0], s=[0.2, 0.5, 0.8, 0.35], sigma_d=SD)


def _x_t(n, t_value, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = G.sample(n, g)
    z = SD * torch.randn(n, G.dim, generator=g, dtype=torch.float64)
    t = torch.full((n,), t_value, dtype=torch.float64)
    return x0, z, t, add_noise(x0, z, t)


@pytest.mark.parametrize("t_value", [1e-3, 0.1, 0.8, 1.3, t_max_default(), math.pi / 2 - 1e-6])
def test_exact_teacher_and_exact_consistency_model_give_zero_target(t_value):
    _, _, t, x_t = _x_t(64, t_value)
    dxdt = SD * G.F_star(x_t / SD, t)  # sCD with the exact teacher
    F, JF = jvp_tangent(G.F_cm, x_t, t, dxdt, SD)
    g = scm_target(F, JF, x_t, dxdt, t, SD)
    # g = cos t·df*/dt = 0 exactly; float64 cancellation between O(1) terms leaves ~1e-13
    # (near t = 0, F_cm = (cos t·x − f*)/(σ_d sin t) loses digits as 1/t: ~1e-16/1e-3 relative).
    assert float(g.abs().max()) < 1e-10
    # the same holds for the sCT velocity averaged over the posterior of (x0, z) given x_t (linear in dx/dt)
    x_one, t_one = x_t[:1], t[:1]
    x0s = G.posterior_x0(x_one, t_one, 20000, torch.Generator().manual_seed(1))
    sin_t = math.sin(t_value)
    z = (x_one - math.cos(t_value) * x0s) / sin_t
    v = sct_velocity(x0s, z, t_one.expand(20000))
    F1, JF1 = jvp_tangent(G.F_cm, x_one.expand(20000, -1), t_one.expand(20000), v, SD)
    g_sct = scm_target(F1, JF1, x_one.expand(20000, -1), v, t_one.expand(20000), SD)
    se = g_sct.std(0) / math.sqrt(20000)
    assert bool((g_sct.mean(0).abs() <= 5 * se + 1e-12).all()), (g_sct.mean(0), se)


def _moments_close(x, n):
    # 5 standard errors: se(mean) = s/sqrt(n), se(std) ≈ s/sqrt(2n).
    torch.testing.assert_close(x.mean(0), G.mu, atol=float(5 * G.s.max() / math.sqrt(n)), rtol=0)
    torch.testing.assert_close(x.std(0), G.s, atol=float(5 * G.s.max() / math.sqrt(2 * n)), rtol=0)


def test_exact_consistency_model_samples_the_data_in_one_and_two_steps():
    n = 40000
    gen = torch.Generator().manual_seed(3)
    noise = SD * torch.randn(n, G.dim, generator=gen, dtype=torch.float64)
    # from t = π/2 the prior is exact, so only Monte-Carlo error remains
    _moments_close(consistency_sample(G.F_cm, noise, [math.pi / 2], SD), n)
    # from the paper's t_max the prior misses the mean by cos(t_max)·μ·s/v ≈ 0.6 % of μ: within tolerance
    x1 = consistency_sample(G.F_cm, noise, consistency_times(1), SD)
    _moments_close(x1, n)
    x2 = consistency_sample(G.F_cm, noise, consistency_times(2), SD, generator=gen)
    _moments_close(x2, n)
    x4 = consistency_sample(G.F_cm, noise, consistency_times(4), SD, generator=gen)
    _moments_close(x4, n)


@pytest.mark.parametrize("solver,steps", [("euler", 256), ("heun", 32)])
def test_ode_samplers_driven_by_the_exact_teacher_sample_the_data(solver, steps):
    n = 40000
    noise = SD * torch.randn(n, G.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _moments_close(ode_sample(G.F_star, noise, ode_times(steps), SD, solver=solver), n)


def test_ode_solvers_converge_at_first_and_second_order():
    noise = SD * torch.randn(500, G.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    errors = {}
    for solver in ("euler", "heun"):
        errs = []
        for steps in (16, 32, 64):
            ts = ode_times(steps)
            exact = G.f_star(noise, torch.full((500,), ts[0], dtype=torch.float64))  # the true ODE endpoint
            errs.append(float((ode_sample(G.F_star, noise, ts, SD, solver=solver) - exact).abs().max()))
        errors[solver] = errs
    # halving the step multiplies the error by ~1/2 (first order) and ~1/4 (second order); measured
    # ratios are 1.98/1.99 and 4.6/4.3, so the bands below separate the two orders with margin.
    for a, b in zip(errors["euler"][:-1], errors["euler"][1:], strict=True):
        assert 1.7 < a / b < 2.4
    for a, b in zip(errors["heun"][:-1], errors["heun"][1:], strict=True):
        assert 3.3 < a / b < 6.0
    assert errors["heun"][-1] < errors["euler"][-1] / 10


class Perturbed(nn.Module):
    """F_θ = F_cm + a + b·x (per-dimension a, b): the exact consistency model moved away by θ = (a, b)."""

    def __init__(self, base, scale=0.2):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.full((G.dim,), scale, dtype=torch.float64))
        self.b = nn.Parameter(torch.full((G.dim,), -scale, dtype=torch.float64))

    def forward(self, x, t, **_):
        return self.base(x, t) + self.a + self.b * x

    def theta_norm(self):
        return float(torch.cat([self.a, self.b]).detach().norm())


@pytest.mark.parametrize("method", ["scd", "sct"])
def test_consistency_loss_gradient_points_back_to_the_exact_model(method):
    model = Perturbed(G.F_cm)
    teacher = G.F_star if method == "scd" else None
    loss_fn = ConsistencyLoss(sigma_d=SD, teacher=teacher, adaptive_weight=False, warmup_kimg=0)
    gen = torch.Generator().manual_seed(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    start = model.theta_norm()
    for i in range(25):
        x0 = G.sample(4096, gen)
        loss, _ = loss_fn(model, x0, step=i, generator=gen)
        opt.zero_grad()
        loss.backward()
        if i == 0:
            theta = torch.cat([model.a, model.b]).detach()
            grad = torch.cat([model.a.grad, model.b.grad])
            cos = float(grad @ theta / (grad.norm() * theta.norm()))
            assert cos > 0.3, f"the first gradient does not point back to f* (cosine {cos:.3f})"
        opt.step()
    assert model.theta_norm() < 0.5 * start, (start, model.theta_norm())


def test_diffusion_loss_is_minimised_by_the_exact_teacher():
    model = Perturbed(G.F_star, scale=0.3)
    loss_fn = DiffusionLoss(sigma_d=SD, P_mean=-0.8, P_std=1.6, adaptive_weight=False)
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    start = model.theta_norm()
    for _ in range(40):
        loss, _ = loss_fn(model, G.sample(4096, gen), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.theta_norm() < 0.2 * start
    # at θ = 0 the expected gradient vanishes: a large-batch estimate is ~0 up to Monte-Carlo noise
    exact = Perturbed(G.F_star, scale=0.0)
    loss, _ = loss_fn(exact, G.sample(200000, gen), generator=gen)
    grad = torch.autograd.grad(loss, [exact.a, exact.b])
    assert float(torch.cat(grad).abs().max()) < 0.02
