import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scm import trigflow

SD = 0.5


def _batch(dtype=torch.float64, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    z = SD * torch.randn(B, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    t = torch.rand(B, generator=g, dtype=torch.float64) * math.pi / 2
    return x0, z, t


def test_add_noise_endpoints():
    x0, z, _ = _batch()
    zeros, halfpi = torch.zeros(4, dtype=torch.float64), torch.full((4,), math.pi / 2, dtype=torch.float64)
    torch.testing.assert_close(trigflow.add_noise(x0, z, zeros), x0)
    torch.testing.assert_close(trigflow.add_noise(x0, z, halfpi), z, atol=1e-15, rtol=0)


def test_sct_velocity_is_time_derivative_of_x_t():
    # Central difference in float64 with h = 1e-6: truncation ~h²·|x| ~ 1e-12, rounding ~1e-16/h ~ 1e-10.
    x0, z, t = _batch()
    t = t.clamp(1e-3, math.pi / 2 - 1e-3)
    h = 1e-6
    fd = (trigflow.add_noise(x0, z, t + h) - trigflow.add_noise(x0, z, t - h)) / (2 * h)
    torch.testing.assert_close(trigflow.sct_velocity(x0, z, t), fd, atol=1e-8, rtol=1e-8)


def test_denoise_boundaries_and_exactness():
    x0, z, t = _batch()
    F = torch.randn_like(x0)
    zeros = torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(trigflow.denoise(x0, F, zeros, SD), x0)  # boundary condition f(x, 0) = x
    halfpi = torch.full((4,), math.pi / 2, dtype=torch.float64)
    torch.testing.assert_close(trigflow.denoise(z, F, halfpi, SD), -SD * F, atol=1e-15, rtol=0)
    # With the velocity target F = v_t/σ_d of one (x0, z) pair the denoiser returns x0 exactly.
    x_t = trigflow.add_noise(x0, z, t)
    F_true = trigflow.sct_velocity(x0, z, t) / SD
    torch.testing.assert_close(trigflow.denoise(x_t, F_true, t, SD), x0)


def test_ddim_step_is_exact_for_a_point_mass():
    # For data = one point c, F* = v_t/σ_d along the straight (c, z) trajectory, and eq. 26 is exact.
    x0, z, t = _batch()
    s = t
    t_next = t * 0.37
    x_s = trigflow.add_noise(x0, z, s)
    F = trigflow.sct_velocity(x0, z, s) / SD
    torch.testing.assert_close(trigflow.ddim_step(x_s, F, s, t_next, SD), trigflow.add_noise(x0, z, t_next))
    # and a step to t = 0 is the denoiser
    torch.testing.assert_close(trigflow.ddim_step(x_s, F, s, torch.zeros_like(s), SD), trigflow.denoise(x_s, F, s, SD))


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-4, 1e4), st.floats(0.05, 2.0))
def test_sigma_t_roundtrip(sigma, sigma_d):
    s = torch.tensor([sigma], dtype=torch.float64)
    t = trigflow.t_from_sigma(s, sigma_d)
    assert 0 < float(t) < math.pi / 2
    torch.testing.assert_close(trigflow.sigma_from_t(t, sigma_d), s, rtol=1e-10, atol=0)


def test_t_max_default():
    assert trigflow.t_max_default() == pytest.approx(math.atan(160.0))
    assert trigflow.t_max_default() == pytest.approx(1.56454, abs=1e-5)


def test_sample_t_is_reproducible_and_log_normal():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = trigflow.sample_t(20000, -1.0, 1.4, SD, generator=g1)
    b = trigflow.sample_t(20000, -1.0, 1.4, SD, generator=g2)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == (20000,)
    assert bool((a > 0).all() and (a < math.pi / 2).all())
    log_sigma = torch.log(SD * torch.tan(a.double()))
    # 4 standard errors: std/sqrt(n) = 1.4/141 ≈ 0.01 for the mean, ≈ 1.4/sqrt(2n) ≈ 0.007 for the std.
    assert float(log_sigma.mean()) == pytest.approx(-1.0, abs=0.04)
    assert float(log_sigma.std()) == pytest.approx(1.4, abs=0.03)
    c = trigflow.sample_t(5, -1.0, 1.4, SD, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert c.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_functions_keep_the_input_dtype(dtype):
    x0, z, t = _batch(dtype)
    t32 = t.float()
    for out in (
        trigflow.add_noise(x0, z, t32),
        trigflow.sct_velocity(x0, z, t),
        trigflow.denoise(x0, z, t32, SD),
        trigflow.ddim_step(x0, z, t32, t32 * 0.5, SD),
    ):
        assert out.dtype == dtype
    ref = trigflow.add_noise(x0.double(), z.double(), t)
    # half types: the result is computed in float32 and rounded once (relative error ≤ 2^-8 for bf16)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(trigflow.add_noise(x0, z, t).double(), ref, atol=tol * 4, rtol=tol)


def test_time_values_are_checked_where_they_enter():
    """The maths functions check shapes only (reading values would stall a GPU on every call); values are
    checked once where a caller's times enter: `checked_t` (used by the objectives), and the samplers."""
    from scm._checks import checked_t
    from scm.objectives import DiffusionLoss

    x0, _, t = _batch()
    for bad in (t + 2.0, -t, torch.full_like(t, float("nan"))):
        with pytest.raises(ValueError, match=r"\[0, π/2\]"):
            checked_t(bad, x0)
        with pytest.raises(ValueError, match=r"\[0, π/2\]"):
            DiffusionLoss(adaptive_weight=False)(lambda x, tt: x, x0, t=bad)
    # up to π/2 + 1e-5 is accepted and clamped (diffusers' SCMScheduler stores π/2 as 1.57080)
    top = checked_t(torch.tensor([1.57080, math.pi / 2 + 9e-6, 0.3], dtype=torch.float64))
    assert top.tolist() == [math.pi / 2, math.pi / 2, 0.3]
    with pytest.raises(ValueError, match=r"\[0, π/2\]"):
        checked_t(torch.tensor([math.pi / 2 + 2e-5], dtype=torch.float64))


def test_bad_inputs_raise_clear_errors():
    x0, z, t = _batch()
    with pytest.raises(ValueError, match="shape"):
        trigflow.add_noise(x0, z, t[:3])
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        trigflow.add_noise(x0, z, t[:, None])
    with pytest.raises(ValueError, match="z has shape"):
        trigflow.add_noise(x0, z[:, :2], t)
    with pytest.raises(ValueError, match="sigma_d"):
        trigflow.denoise(x0, z, t, -1.0)
    with pytest.raises(ValueError, match="P_std"):
        trigflow.sample_t(4, 0.0, 0.0, SD)
    with pytest.raises(TypeError, match="floating"):
        trigflow.add_noise(x0, z, torch.ones(4, dtype=torch.long))
