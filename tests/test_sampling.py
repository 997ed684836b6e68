import itertools
import math

import pytest
import torch

from scm.sampling import check_times, consistency_sample, consistency_times, ode_sample, ode_times
from scm.trigflow import add_noise, ddim_step, denoise, t_max_default

SD = 0.5


class Recorder:
    """A deterministic fake network that records every call (input and time)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, **cond):
        self.calls.append((x.clone(), t.clone(), cond))
        return torch.sin(3 * x) + torch.cos(t)[:, None, None, None] * 0.3


def _noise(B=3, seed=0):
    return SD * torch.randn(B, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_default_times():
    assert consistency_times(1) == [pytest.approx(math.atan(160))]
    assert consistency_times(2) == [pytest.approx(1.56454, abs=1e-5), 1.1]
    four = consistency_times(4)
    assert len(four) == 4 and four[1] == 1.1 and all(a > b for a, b in itertools.pairwise(four))
    ts = ode_times(18)
    assert len(ts) == 18 and ts[0] == pytest.approx(math.atan(160))
    assert 0.5 * math.tan(ts[-1]) == pytest.approx(0.002)


def test_one_step_is_denoise_at_t_max():
    net, noise = Recorder(), _noise()
    out = consistency_sample(net, noise, consistency_times(1), SD)
    t = torch.full((3,), t_max_default(), dtype=torch.float64)
    expected = denoise(noise, net(noise / SD, t), t, SD)
    torch.testing.assert_close(out, expected)
    assert len(net.calls) == 2  # the sampler's one evaluation + ours
    torch.testing.assert_close(net.calls[0][0], noise / SD)  # the network sees x/σ_d


def test_two_step_uses_t_mid_and_fresh_noise():
    net, noise = Recorder(), _noise()
    out = consistency_sample(net, noise, consistency_times(2), SD, generator=torch.Generator().manual_seed(9))
    assert [float(c[1][0]) for c in net.calls] == [pytest.approx(t_max_default()), pytest.approx(1.1)]
    # replay by hand: x̂0 = f(noise, t_max); x_mid = cos(1.1)·x̂0 + sin(1.1)·σ_d·ε; x̂0 = f(x_mid, 1.1)
    g = torch.Generator().manual_seed(9)
    t0 = torch.full((3,), t_max_default(), dtype=torch.float64)
    x0_hat = denoise(noise, Recorder()(noise / SD, t0), t0, SD)
    eps = torch.randn(noise.shape, generator=g, dtype=torch.float64)
    t1 = torch.full((3,), 1.1, dtype=torch.float64)
    x_mid = add_noise(x0_hat, SD * eps, t1)
    torch.testing.assert_close(net.calls[1][0], x_mid / SD)
    torch.testing.assert_close(out, denoise(x_mid, Recorder()(x_mid / SD, t1), t1, SD))
    # a different generator gives different fresh noise
    out2 = consistency_sample(Recorder(), noise, consistency_times(2), SD, generator=torch.Generator().manual_seed(10))
    assert not torch.allclose(out, out2)


def test_n_step_follows_the_renoising_formula_and_accepts_a_trailing_zero():
    ts = [1.5, 1.2, 0.7, 0.2]
    noise = _noise(seed=1)
    net = Recorder()
    out = consistency_sample(net, noise, [*ts, 0.0], SD, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    x, x0_hat = noise, None
    for i, t in enumerate(ts):
        tb = torch.full((3,), t, dtype=torch.float64)
        if i:
            x = add_noise(x0_hat, SD * torch.randn(noise.shape, generator=g, dtype=torch.float64), tb)
        torch.testing.assert_close(net.calls[i][0], x / SD)
        x0_hat = denoise(x, Recorder()(x / SD, tb), tb, SD)
    assert len(net.calls) == len(ts)  # the trailing 0 costs no evaluation
    torch.testing.assert_close(out, x0_hat)


def test_sampling_is_deterministic_for_a_seed():
    a = consistency_sample(Recorder(), _noise(), [1.5, 1.0, 0.5], SD, generator=torch.Generator().manual_seed(1))
    b = consistency_sample(Recorder(), _noise(), [1.5, 1.0, 0.5], SD, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_ode_euler_is_a_chain_of_ddim_steps_and_heun_uses_2n_minus_1_evaluations():
    ts = ode_times(5)
    noise = _noise(seed=3)
    net = Recorder()
    out = ode_sample(net, noise, ts, SD, solver="euler")
    x = noise
    for a, b in zip(ts, [*ts[1:], 0.0], strict=True):
        ta = torch.full((3,), a, dtype=torch.float64)
        x = ddim_step(x, Recorder()(x / SD, ta), ta, torch.full((3,), b, dtype=torch.float64), SD)
    torch.testing.assert_close(out, x)
    assert len(net.calls) == 5
    heun = Recorder()
    ode_sample(heun, noise, ts, SD, solver="heun")
    assert len(heun.calls) == 2 * 5 - 1


def test_cond_is_passed_to_the_network():
    net = Recorder()
    labels = torch.tensor([0, 1, 2])
    consistency_sample(net, _noise(), [1.5], SD, labels=labels, guidance=1.3)
    ode_sample(net, _noise(), [1.5, 0.5], SD, labels=labels)
    assert all(torch.equal(c[2]["labels"], labels) for c in net.calls)
    assert net.calls[0][2]["guidance"] == 1.3


def test_samplers_return_the_noise_dtype():
    noise = _noise().float()
    assert consistency_sample(Recorder(), noise, [1.5, 1.1], SD).dtype == torch.float32
    assert ode_sample(Recorder(), noise, [1.5, 1.1], SD, solver="heun").dtype == torch.float32


@pytest.mark.parametrize("sampler", [consistency_sample, ode_sample])
def test_bad_times(sampler):
    noise = _noise()
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampler(Recorder(), noise, [1.0, 1.2], SD)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampler(Recorder(), noise, [1.0, 1.0], SD)
    with pytest.raises(ValueError, match=r"outside \(0, π/2\]"):
        sampler(Recorder(), noise, [2.0, 1.0], SD)
    with pytest.raises(ValueError, match=r"outside \(0, π/2\]"):
        sampler(Recorder(), noise, [1.0, 0.0, 0.5], SD)
    with pytest.raises(ValueError, match="at least one"):
        sampler(Recorder(), noise, [], SD)
    with pytest.raises(ValueError, match=r"outside \(0, π/2\]"):
        sampler(Recorder(), noise, [math.pi / 2 + 2e-5], SD)
    with pytest.raises(ValueError, match="shape"):
        sampler(lambda x, t: x[:, :, :2], noise, [1.0], SD)


def test_bad_solver_and_steps():
    with pytest.raises(ValueError, match="solver"):
        ode_sample(Recorder(), _noise(), [1.0], SD, solver="rk4")
    with pytest.raises(ValueError, match="steps"):
        consistency_times(0)
    with pytest.raises(ValueError, match="t_mid"):
        consistency_times(2, t_mid=1.6)


def test_times_just_above_half_pi_are_clamped():
    """diffusers' SCMScheduler stores t_max = π/2 as 1.57080 (3.7e-6 above): accepted, evaluated at π/2."""
    assert check_times([1.57080, 1.1]) == [math.pi / 2, 1.1]
    rec = Recorder()
    consistency_sample(rec, _noise(), [1.57080, 1.1], SD, generator=torch.Generator().manual_seed(0))
    assert rec.calls[0][1][0].item() == pytest.approx(math.pi / 2, abs=1e-7)
