import math

import pytest
import torch

from scm.tangents import jvp_tangent
from scm.teachers import from_edm, from_flow
from scm.trigflow import add_noise, sct_velocity

from oracle import Gaussian

SD = 0.5
G = Gaussian(mu=[0.3, -0.2, 0.1], s=[0.2, 0.5, 0.8], sigma_d=SD)


def _points(ts):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(ts, dtype=torch.float64)
    x0 = G.sample(len(ts), g)
    z = SD * torch.randn(len(ts), G.dim, generator=g, dtype=torch.float64)
    return add_noise(x0, z, t), t, sct_velocity(x0, z, t)


INTERIOR = [1e-4, 0.05, 0.4, 0.785, 1.2, 1.55, math.pi / 2 - 1e-4]


def test_from_edm_of_the_closed_form_denoiser_is_F_star():
    x_t, t, _ = _points(INTERIOR)
    # float64; the conversion divides by sin t and by cos t, costing ~1/1e-4 of relative precision at the ends
    torch.testing.assert_close(from_edm(G.edm_D, SD)(x_t / SD, t), G.F_star(x_t / SD, t), atol=1e-9, rtol=1e-9)


def test_from_flow_of_the_closed_form_velocity_is_F_star_on_the_closed_interval():
    x_t, t, _ = _points([0.0, *INTERIOR, math.pi / 2])
    F = from_flow(G.flow_v, SD, data="unit")(x_t / SD, t)  # the oracle's flow runs on y = x0/σ_d
    torch.testing.assert_close(F, G.F_star(x_t / SD, t), atol=1e-12, rtol=1e-12)


def test_from_flow_time_scale_feeds_scaled_time():
    seen = {}

    def v(x, s):
        seen["s"] = s
        return G.flow_v(x, s / 1000)

    x_t, t, _ = _points([0.3, 1.0])
    F = from_flow(v, SD, time_scale=1000, data="unit")(x_t / SD, t)
    assert float(seen["s"].max()) > 1.0
    torch.testing.assert_close(F, G.F_star(x_t / SD, t))


@pytest.mark.parametrize("wrap", ["edm", "flow"])
def test_forward_mode_ad_flows_through_the_adapters(wrap):
    fn = from_edm(G.edm_D, SD) if wrap == "edm" else from_flow(G.flow_v, SD, data="unit")
    x_t, t, dxdt = _points([0.05, 0.7, 1.4])
    F, JF = jvp_tangent(fn, x_t, t, dxdt, SD)
    F_ref, JF_ref = jvp_tangent(G.F_star, x_t, t, dxdt, SD)
    torch.testing.assert_close(F, F_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(JF, JF_ref, atol=1e-10, rtol=1e-9)


def test_from_edm_is_defined_inside_the_interval_only():
    """An EDM denoiser has no input at σ = 0 or σ = ∞: the wrapper's output there is not finite (it does not read
    t's values, which would stall a GPU inside every training step); inside, it is finite."""
    x_t, _, _ = _points([0.3, 0.4])
    F = from_edm(G.edm_D, SD)(x_t / SD, torch.tensor([0.0, 0.3], dtype=torch.float64))
    assert not torch.isfinite(F[0]).all() and torch.isfinite(F[1]).all()
    with pytest.raises(ValueError, match="sigma_d"):
        from_edm(G.edm_D, 0.0)
