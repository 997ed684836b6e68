import math

import pytest
import torch

from scm.objectives import (
    ConsistencyLoss,
    DiffusionLoss,
    normalize_tangent,
    scm_target,
    tangent_warmup,
    vsd_direction,
)
from scm.tangents import jvp_tangent
from scm.trigflow import add_noise, ddim_step, denoise, sct_velocity

SD = 0.5


def _batch(B=8, dim=6, seed=0, t_range=(0.2, 1.3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, dim, generator=g, dtype=torch.float64) * 0.6
    z = SD * torch.randn(B, dim, generator=g, dtype=torch.float64)
    lo, hi = t_range
    t = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
    return x0, z, t


def _grads(net, loss):
    params = [p for n, p in net.named_parameters() if not n.startswith("weight_head")]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_discrete_time_gradient_tends_to_the_continuous_one(small_net, method):
    """Paper §2.2: ∇_θ E[w(t)·‖f_θ(x_t, t) − f_θ⁻(x_{t−Δt}, t−Δt)‖²]/Δt → the sCM gradient as Δt → 0,
    with w(t) = 1/(σ_d tan t) (the prior weight that the sCM target g = cos t·df/dt has folded in)."""
    net = small_net(6, seed=1).double()
    teacher = small_net(6, seed=2).double() if method == "scd" else None
    x0, z, t = _batch()
    loss_fn = ConsistencyLoss(sigma_d=SD, teacher=teacher, tangent_norm_c=None, adaptive_weight=False, warmup_kimg=0)
    continuous = _grads(net, loss_fn(net, x0, t=t, z=z)[0])

    x_t = add_noise(x0, z, t)
    errors = []
    for dt in (1e-2, 1e-3, 1e-4):
        if teacher is None:
            x_prev = add_noise(x0, z, t - dt)  # sCT: the same (x0, z) at the earlier time
        else:
            with torch.no_grad():  # sCD: one DDIM step of the teacher (eq. 26)
                x_prev = ddim_step(x_t, teacher(x_t / SD, t), t, t - dt, SD)
        f = denoise(x_t, net(x_t / SD, t), t, SD)
        with torch.no_grad():
            f_minus = denoise(x_prev, net(x_prev / SD, t - dt), t - dt, SD)
        w = 1 / (SD * torch.tan(t))
        loss = (w * ((f - f_minus) ** 2).mean(dim=1)).mean()
        discrete = _grads(net, loss) / dt
        errors.append(float((discrete - continuous).norm() / continuous.norm()))
    # O(Δt) convergence: each decade of Δt removes about a decade of error (float64 keeps rounding ~1e-12).
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5, errors
    assert errors[2] < 1e-3, errors


def test_loss_matches_algorithm_1_by_hand(small_net):
    net = small_net(6, seed=3).double()
    x0, z, t = _batch(seed=4)
    step, H = 300, 1000
    loss_fn = ConsistencyLoss(sigma_d=SD, warmup_kimg=H, adaptive_weight=True)
    loss, stats = loss_fn(net, x0, step, t=t, z=z)

    x_t = add_noise(x0, z, t)
    dxdt = sct_velocity(x0, z, t)
    _, JF = jvp_tangent(net, x_t, t, dxdt, SD)
    F, w = net(x_t / SD, t, return_weight=True)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    r = step / H
    g = -c**2 * (SD * F.detach() - dxdt) - r * (c * s * x_t + SD * JF)
    norm = g.norm(dim=1, keepdim=True)
    g = g / (norm + 0.1)
    expected = (torch.exp(w) * ((F - F.detach() - g) ** 2).mean(dim=1) - w).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["g_norm"], norm.mean())
    assert float(stats["r"]) == pytest.approx(0.3)
    g1 = torch.autograd.grad(loss, list(net.parameters()))
    g2 = torch.autograd.grad(expected, list(net.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_fused_pass_equals_separate_passes_and_dropout_is_shared(small_net):
    net = small_net(6, dropout=0.3, seed=5).double().train()
    x0, z, t = _batch(seed=6)

    def grads(**kw):
        torch.manual_seed(11)
        loss, _ = ConsistencyLoss(sigma_d=SD, warmup_kimg=0, **kw)(net, x0, t=t, z=z)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])

    fused = grads(fused_pass=True)
    separate = grads(fused_pass=False, share_dropout=True)
    torch.testing.assert_close(separate, fused)  # one mask in both cases
    independent = grads(fused_pass=False, share_dropout=False)
    assert not torch.allclose(independent, fused)  # a second mask changes the target


def test_warmup_r_zero_is_velocity_matching(small_net):
    net = small_net(6, seed=7).double()
    x0, z, t = _batch(seed=8)
    x_t, dxdt = add_noise(x0, z, t), sct_velocity(x0, z, t)
    F, JF = jvp_tangent(net, x_t, t, dxdt, SD)
    g0 = scm_target(F, JF, x_t, dxdt, t, SD, r=0.0)
    torch.testing.assert_close(g0, -torch.cos(t)[:, None] ** 2 * (SD * F - dxdt))
    assert tangent_warmup(0, 10_000) == 0.0
    assert tangent_warmup(5_000, 10_000) == 0.5
    assert tangent_warmup(20_000, 10_000) == 1.0
    assert tangent_warmup(3, 0) == 1.0


def test_tangent_normalization_norms():
    g = torch.ones(2, 4, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0], dtype=torch.float64)[:, None, None]
    out, n = normalize_tangent(g, 0.1, "l2")
    torch.testing.assert_close(n, torch.tensor([math.sqrt(20), 3 * math.sqrt(20)], dtype=torch.float64))
    torch.testing.assert_close(out[1], g[1] / (3 * math.sqrt(20) + 0.1))
    out_rms, n_rms = normalize_tangent(g, 0.1, "rms")
    torch.testing.assert_close(n_rms, torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(out_rms[0], g[0] / 1.1)
    with pytest.raises(ValueError, match="norm"):
        normalize_tangent(g, 0.1, "linf")


def test_extra_sigma_weight_and_weighting_switches(small_net):
    net = small_net(6, seed=9).double()
    x0, z, t = _batch(B=1, seed=10)
    base = ConsistencyLoss(sigma_d=SD, adaptive_weight=False, warmup_kimg=0)
    extra = ConsistencyLoss(sigma_d=SD, adaptive_weight=False, warmup_kimg=0, extra_sigma_weight=True)
    l0, _ = base(net, x0, t=t, z=z)
    l1, _ = extra(net, x0, t=t, z=z)
    torch.testing.assert_close(l1, l0 / (SD * torch.tan(t[0])))
    raw = ConsistencyLoss(sigma_d=SD, adaptive_weight=False, warmup_kimg=0, tangent_norm_c=None)
    l_raw, stats = raw(net, x0, t=t, z=z)
    # without normalization the loss value is mean(g²) = ‖g‖²/D
    torch.testing.assert_close(l_raw, stats["g_norm"] ** 2 / 6)


def test_scd_with_guidance_feeds_the_scale_to_teacher_and_student(small_net):
    calls = []

    def teacher(x, t, labels=None):
        calls.append(labels)
        return torch.zeros_like(x) if labels is None else torch.ones_like(x)

    seen = {}
    student_net = small_net(6, num_classes=3, seed=11).double()

    def student(x, t, labels=None, guidance=None, return_weight=False):
        seen["guidance"] = guidance
        return student_net(x, t, labels=labels, guidance=guidance, return_weight=return_weight)

    x0, _, _ = _batch(seed=12)
    labels = torch.arange(8) % 3
    with pytest.raises(ValueError, match="teacher_uncond"):  # no guessing of the teacher's unconditional input
        ConsistencyLoss(sigma_d=SD, teacher=teacher, guidance=(1.0, 2.0))
    loss_fn = ConsistencyLoss(sigma_d=SD, teacher=teacher, guidance=(1.0, 2.0), teacher_uncond={"labels": None})
    loss, _ = loss_fn(student, x0, generator=torch.Generator().manual_seed(0), labels=labels)
    assert torch.isfinite(loss)
    assert len(calls) == 2 and calls[1] is None and torch.equal(calls[0], labels)  # cond + uncond
    s = seen["guidance"]
    assert s.shape == (8,) and bool(((s >= 1) & (s <= 2)).all()) and float(s.std()) > 0
    assert loss_fn.method == "scd" and ConsistencyLoss().method == "sct"


def test_diffusion_loss_matches_eq_4_with_adaptive_weight(small_net):
    net = small_net(6, seed=13).double()
    x0, z, t = _batch(seed=14)
    loss, stats = DiffusionLoss(sigma_d=SD)(net, x0, t=t, z=z)
    x_t = add_noise(x0, z, t)
    F, w = net(x_t / SD, t, return_weight=True)
    v = torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0
    mse = ((F - v / SD) ** 2).mean(dim=1)
    torch.testing.assert_close(loss, (torch.exp(w) * mse - w).mean())
    torch.testing.assert_close(stats["mse"], mse.mean())
    plain, _ = DiffusionLoss(sigma_d=SD, adaptive_weight=False)(net, x0, t=t, z=z)
    torch.testing.assert_close(plain, mse.mean())


def test_losses_are_reproducible_from_a_generator(small_net):
    net = small_net(6, seed=15).double()
    x0, _, _ = _batch(seed=16)
    for loss_fn in (DiffusionLoss(), ConsistencyLoss()):
        a = loss_fn(net, x0, generator=torch.Generator().manual_seed(3))[0]
        b = loss_fn(net, x0, generator=torch.Generator().manual_seed(3))[0]
        assert torch.equal(a, b)


def test_bad_configuration():
    with pytest.raises(ValueError, match="P_std"):
        ConsistencyLoss(P_std=0)
    with pytest.raises(ValueError, match="P_std"):
        DiffusionLoss(P_std=-1)
    x0, _, _ = _batch()
    with pytest.raises(ValueError, match=r"guidance.*is for sCD"):  # a configuration has no teacher: checked in use
        ConsistencyLoss(guidance=(1.0, 2.0))(lambda x, t, **k: (x, t), x0)
    with pytest.raises(ValueError, match=r"guidance=\(2.0, 1.0\): must be a range"):
        ConsistencyLoss(teacher=lambda x, t: x, guidance=(2.0, 1.0), teacher_uncond={})
    with pytest.raises(ValueError, match="tangent_precision"):
        ConsistencyLoss(tangent_precision="fp8")
    with pytest.raises(ValueError, match="tangent_norm"):
        ConsistencyLoss(tangent_norm="max")
    with pytest.raises(ValueError, match="tangent_method"):
        ConsistencyLoss(tangent_method="magic")
    with pytest.raises(ValueError, match="warmup"):
        ConsistencyLoss(warmup_kimg=-1)
    with pytest.raises(ValueError, match="tangent_norm_c"):
        ConsistencyLoss(tangent_norm_c=0.0)


def test_adaptive_weighting_needs_a_weight_head():
    x0, _, _ = _batch()
    with pytest.raises(TypeError, match="return_weight"):
        ConsistencyLoss()(lambda x, t, return_weight=False: torch.zeros_like(x), x0)


def test_discrete_time_consistency_tends_to_the_continuous_target(small_net):
    """The discrete-time CM (backward difference with Δt = (π/2)/N) approaches the continuous JVP target as N grows."""
    net = small_net(6, seed=17).double()
    x0, z, t = _batch(seed=18)
    x_t, dxdt = add_noise(x0, z, t), sct_velocity(x0, z, t)
    _, exact = jvp_tangent(net, x_t, t, dxdt, SD)
    errors = []
    for n in (64, 1024, 16384):
        _, approx = jvp_tangent(net, x_t, t, dxdt, SD, method="discrete", fd_step=(math.pi / 2) / n)
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors  # first order in Δt
    assert errors[0] / errors[1] > 8
    loss, _ = ConsistencyLoss(sigma_d=SD, discrete_steps=256, adaptive_weight=False)(net, x0, t=t, z=z)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="fd_step"):
        jvp_tangent(net, x_t, t, dxdt, SD, method="discrete")


def test_vsd_direction_is_the_score_difference_of_the_noised_distributions():
    """cos t·(x̂0_fake − x̂0_real)/(σ_d² sin²t) = ∇log p_fake,t − ∇log p_real,t (Tweedie), checked against the closed-form
    scores of two Gaussians' TrigFlow marginals N(cos t·μ, cos²t·s² + sin²t·σ_d²); float64 throughout, so the
    tolerance is rounding only."""
    from oracle import Gaussian

    real, fake = Gaussian([0.3, -0.2, 0.1], [0.5, 0.4, 0.6], SD), Gaussian([-0.1, 0.4, 0.0], [0.8, 0.3, 0.5], SD)
    _, z, t = _batch(B=16, dim=3, seed=3, t_range=(0.1, 1.5))
    x_t = add_noise(real.sample(16, torch.Generator().manual_seed(4)), z, t)
    d = vsd_direction(x_t, fake.F_star(x_t / SD, t), real.F_star(x_t / SD, t), t, SD)

    def score(g):
        tt = t[:, None]
        m, v2 = torch.cos(tt) * g.mu, torch.cos(tt) ** 2 * g.s**2 + torch.sin(tt) ** 2 * SD**2
        return -(x_t - m) / v2

    tt = t[:, None]
    torch.testing.assert_close(torch.cos(tt) * d / (SD * torch.sin(tt)) ** 2, score(fake) - score(real), rtol=1e-10,
                               atol=1e-12)


class _Shift(torch.nn.Module):
    """A network F(x, t) = b (one learnable vector, the same for every input): its one-step sample is
    x_g = cos t_max·z − sin t_max·σ_d·b, so ∂x_g/∂b = −sin t_max·σ_d."""

    def __init__(self, dim):
        super().__init__()
        self.b = torch.nn.Parameter(torch.linspace(-0.3, 0.3, dim, dtype=torch.float64))

    def forward(self, x, t, **_):
        return self.b.expand_as(x)


def test_vsd_gradient_and_critic_loss_by_hand():
    """sCD + VSD: the student's VSD gradient is 2λ·d̂/D through x_g (d̂ the score-difference direction d normalized
    as DMD does, by the mean distance of the sample from the teacher's denoised estimate), and the critic's
    gradient is its diffusion loss on the detached samples alone. The draws are replayed in the objective's order
    (one-step noise z, then t' and z', then the critic's t and z); float64, so the tolerances are rounding only."""
    from scm.trigflow import sample_t, t_max_default

    from oracle import Gaussian

    real, fake = Gaussian([0.3, -0.2, 0.1, 0.0], [0.5, 0.4, 0.6, 0.5], SD), Gaussian([0.0] * 4, [0.7] * 4, SD)
    B, lam = 8, 0.5
    x0, _, _ = _batch(B=B, dim=4, seed=5)
    student, critic = _Shift(4), torch.nn.Linear(4, 4, dtype=torch.float64)
    critic_net = lambda x, t, **_: critic(x) + fake.F_star(x, t)  # noqa: E731
    loss_fn = ConsistencyLoss(sigma_d=SD, adaptive_weight=False, vsd_weight=lam, teacher=real.F_star)
    vsd, critic_loss, _ = loss_fn._vsd(student, critic_net, x0, {}, torch.Generator().manual_seed(9))
    (lam * vsd + critic_loss).backward()

    g = torch.Generator().manual_seed(9)
    tm = torch.full((B,), t_max_default(SD), dtype=torch.float64)
    z = SD * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_g = (torch.cos(tm)[:, None] * z - torch.sin(tm)[:, None] * SD * student.b).detach()
    t = sample_t(B, loss_fn.vsd_P_mean, loss_fn.vsd_P_std, SD, generator=g, dtype=torch.float64)
    x_t = add_noise(x_g, SD * torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    with torch.no_grad():
        F_real = real.F_star(x_t / SD, t)
        d = vsd_direction(x_t, critic_net(x_t / SD, t), F_real, t, SD)
    d_hat = d / (x_g - denoise(x_t, F_real, t, SD)).abs().mean(dim=1, keepdim=True)
    expected = -torch.sin(tm[0]) * SD * 2 * lam * d_hat.sum(0) / (B * 4)  # mean over B examples and D = 4
    torch.testing.assert_close(student.b.grad, expected, rtol=1e-10, atol=1e-12)

    want = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    DiffusionLoss(SD, loss_fn.critic_P_mean, loss_fn.critic_P_std, False)(critic_net, x_g, generator=g)[0].backward()
    for got, p in zip(want, critic.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)


def test_vsd_settings_are_checked():
    from scm.errors import InvalidSetting

    for bad in ({"vsd_weight": -1.0}, {"vsd_weight": math.nan}, {"vsd_P_std": 0.0}, {"critic_P_mean": math.inf},
                {"vsd_start_kimg": -1.0}):
        with pytest.raises(InvalidSetting, match=next(iter(bad))):
            ConsistencyLoss(**bad)
    x0 = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="critic"):  # VSD without its critic network
        ConsistencyLoss(vsd_weight=1.0, adaptive_weight=False)(_Shift(3).float(), x0)
    with pytest.raises(InvalidSetting, match="vsd_weight"):  # sCT has no teacher to distil from
        ConsistencyLoss(vsd_weight=1.0, adaptive_weight=False)(_Shift(3).float(), x0, critic=_Shift(3).float())


def test_vsd_starts_at_its_kimg(small_net):
    """Before loss.vsd_start_kimg the objective is sCD alone (the same loss, draw for draw, as without VSD) and the
    critic gets no gradient; from it on, the critic is trained."""
    from oracle import Gaussian

    real = Gaussian([0.1] * 6, [0.5] * 6, SD)
    critic = torch.nn.Linear(6, 6, dtype=torch.float64)
    critic_net = lambda x, t, **_: critic(x) + real.F_star(x, t)  # noqa: E731
    net, (x0, _, _) = small_net(6, seed=1).double(), _batch(B=4, dim=6, seed=2)
    settings = dict(sigma_d=SD, adaptive_weight=False, warmup_kimg=0, teacher=real.F_star)
    plain, _ = ConsistencyLoss(**settings)(net, x0, 1.0, generator=torch.Generator().manual_seed(3))
    with_vsd = ConsistencyLoss(**settings, vsd_weight=0.5, vsd_start_kimg=2.0)
    before, stats = with_vsd(net, x0, 1.0, generator=torch.Generator().manual_seed(3), critic=critic_net)
    assert torch.equal(before, plain) and "critic_loss" not in stats
    before.backward()
    assert all(p.grad is None for p in critic.parameters())
    after, stats = with_vsd(net, x0, 2.0, generator=torch.Generator().manual_seed(3), critic=critic_net)
    after.backward()
    assert "critic_loss" in stats and all(p.grad is not None for p in critic.parameters())
