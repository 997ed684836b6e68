import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scm.tangents import jvp_tangent
from scm.trigflow import add_noise, sct_velocity

SD = 0.5
T_CASES = {"near0": 1e-3, "mid": 0.8, "near_pi/2": math.pi / 2 - 1e-3}


def _case(net, t_value, B=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, net.dim, generator=g, dtype=dtype) * 0.7
    z = SD * torch.randn(B, net.dim, generator=g, dtype=dtype)
    t = torch.full((B,), t_value, dtype=dtype) * (1 + 0.01 * torch.arange(B, dtype=dtype))
    t = t.clamp(max=math.pi / 2)
    return add_noise(x0, z, t), t, sct_velocity(x0, z, t)


def _fd_reference(net, x_t, t, dxdt, h=1e-5):
    """cos t·sin t·dF/dt by a central difference along the ODE path (x_t + h·dx/dt, t + h), float64.

    Independent of the rearranged tangent: it perturbs x and t themselves. Error: truncation
    h²/6·|d³F/dt³| ≈ 1e-11 for this smooth O(1) network, rounding ≈ 1e-16/h ≈ 1e-11.
    """
    with torch.no_grad():
        F_plus = net((x_t + h * dxdt) / SD, t + h)
        F_minus = net((x_t - h * dxdt) / SD, t - h)
    return (torch.cos(t) * torch.sin(t))[:, None] * (F_plus - F_minus) / (2 * h)


@pytest.mark.parametrize("where", list(T_CASES))
@pytest.mark.parametrize("method", ["forward_ad", "func"])
def test_jvp_equals_float64_finite_difference(small_net, where, method):
    net = small_net(6).double()
    x_t, t, dxdt = _case(net, T_CASES[where])
    t_fd = t.clamp(max=math.pi / 2 - 2e-5)  # keep t ± h inside [0, π/2]
    F, JF = jvp_tangent(net, x_t, t_fd, dxdt, SD, method=method)
    ref = _fd_reference(net, x_t, t_fd, dxdt)
    torch.testing.assert_close(F, net(x_t / SD, t_fd))
    # |JF| is O(1e-3..1) here; the FD reference is accurate to ~1e-10 (see _fd_reference).
    torch.testing.assert_close(JF, ref, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("where", list(T_CASES))
def test_methods_agree_and_rearrangement_is_exact(small_net, where):
    net = small_net(6).double()
    x_t, t, dxdt = _case(net, T_CASES[where], seed=1)
    F_ad, J_ad = jvp_tangent(net, x_t, t, dxdt, SD)
    _, J_fn = jvp_tangent(net, x_t, t, dxdt, SD, method="func")
    F_fd, J_fd = jvp_tangent(net, x_t, t, dxdt, SD, method="finite_difference")
    _, J_naive = jvp_tangent(net, x_t, t, dxdt, SD, rearranged=False)
    torch.testing.assert_close(J_fn, J_ad, atol=1e-14, rtol=1e-12)  # same maths, different engine
    torch.testing.assert_close(J_naive, J_ad, atol=1e-14, rtol=1e-12)  # exact algebra in float64
    # documented FD error in float64 with the default h = ε^(1/3) ≈ 6e-6: about ε^(2/3) ≈ 4e-11 relative
    torch.testing.assert_close(J_fd, J_ad, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(F_fd, F_ad)


def test_finite_difference_error_in_float32_matches_documentation(small_net):
    net = small_net(6).double()
    x_t, t, dxdt = _case(net, 0.8, B=16, seed=2)
    _, J_exact = jvp_tangent(net, x_t, t, dxdt, SD)
    net32 = net.float()
    _, J_fd = jvp_tangent(net32, x_t.float(), t.float(), dxdt.float(), SD, method="finite_difference")
    rel = float((J_fd.double() - J_exact).norm() / J_exact.norm())
    assert rel < 2e-3, rel  # docs: ~ε^(2/3) ≈ 2e-5 for unit-scale F; allow the network's derivative scale


def test_fused_pass_keeps_the_graph_of_F_only(small_net):
    net = small_net(6, dropout=0.0).double()
    x_t, t, dxdt = _case(net, 0.5, seed=3)
    F, JF = jvp_tangent(net, x_t, t, dxdt, SD, primal_grad=True)
    assert F.requires_grad and not JF.requires_grad and JF.grad_fn is None
    params = [p for name, p in net.named_parameters() if not name.startswith("weight_head")]
    grads = torch.autograd.grad(F.square().sum(), params)
    F_ref = net(x_t / SD, t)
    grads_ref = torch.autograd.grad(F_ref.square().sum(), params)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    _, JF_sep = jvp_tangent(net, x_t, t, dxdt, SD)
    torch.testing.assert_close(JF, JF_sep)


def test_no_graph_and_no_tangent_leaks(small_net):
    net = small_net(6).double()
    x_t, t, dxdt = _case(net, 0.5, seed=4)
    x_t.requires_grad_(True)
    with torch.enable_grad():
        F, JF, aux = jvp_tangent(lambda u, tt: net(u, tt, return_weight=True), x_t, t, dxdt, SD)
    assert F.grad_fn is None and JF.grad_fn is None and aux[0].grad_fn is None
    assert not F.requires_grad and not JF.requires_grad
    assert aux[0].shape == (x_t.shape[0],)
    # outside the call the outputs carry no forward-mode tangent
    with fwAD.dual_level():
        assert fwAD.unpack_dual(F).tangent is None and fwAD.unpack_dual(JF).tangent is None
    # and the network is untouched: the same forward gives the same output
    torch.testing.assert_close(net(x_t.detach() / SD, t), F)


def test_tangent_precision_parameter(small_net):
    net = small_net(6).float()
    x_t, t, dxdt = _case(net, 0.7, B=8, dtype=torch.float32, seed=5)
    _, J32 = jvp_tangent(net, x_t, t, dxdt, SD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, J_bf16 = jvp_tangent(net, x_t, t, dxdt, SD)  # inherits bf16 autocast
        _, J_fp32 = jvp_tangent(net, x_t, t, dxdt, SD, precision=torch.float32)  # fp32 tangents
    _, J_forced = jvp_tangent(net, x_t, t, dxdt, SD, precision=torch.bfloat16)
    assert J_fp32.dtype == J_bf16.dtype == torch.float32  # returned in the input's dtype
    torch.testing.assert_close(J_fp32, J32, atol=1e-6, rtol=1e-5)  # fp32 pass = plain fp32
    err_bf16 = float((J_bf16 - J32).abs().max())
    assert err_bf16 > 1e-4, "bf16 autocast should visibly change the tangent"
    torch.testing.assert_close(J_forced, J_bf16, atol=0, rtol=0)  # precision=bf16 ≡ bf16 autocast


def test_finite_difference_shares_the_dropout_mask(small_net):
    net = small_net(6, dropout=0.3).double().train()
    x_t, t, dxdt = _case(net, 0.9, seed=6)
    torch.manual_seed(123)
    F_ad, J_ad = jvp_tangent(net, x_t, t, dxdt, SD)
    torch.manual_seed(123)
    F_fd, J_fd = jvp_tangent(net, x_t, t, dxdt, SD, method="finite_difference")
    torch.testing.assert_close(F_fd, F_ad)  # same mask for the primal ...
    torch.testing.assert_close(J_fd, J_ad, atol=1e-8, rtol=1e-7)  # ... and for both shifted calls


def test_works_with_any_dtype_and_returns_it(small_net):
    net = small_net(4).double()
    x_t, t, dxdt = _case(net, 0.6)
    F, JF = jvp_tangent(net, x_t, t, dxdt, SD)
    assert F.dtype == JF.dtype == torch.float64


def test_bad_inputs(small_net):
    net = small_net(4).double()
    x_t, t, dxdt = _case(net, 0.6)
    with pytest.raises(ValueError, match="method"):
        jvp_tangent(net, x_t, t, dxdt, SD, method="reverse")
    with pytest.raises(ValueError, match="dxdt has shape"):
        jvp_tangent(net, x_t, t, dxdt[:, :2], SD)
    with pytest.raises(ValueError, match="shape"):
        jvp_tangent(net, x_t, t[:2], dxdt, SD)
    with pytest.raises(ValueError, match="precision"):
        jvp_tangent(net, x_t, t, dxdt, SD, precision=torch.int8)
    with pytest.raises(ValueError, match="fd_step"):
        jvp_tangent(net, x_t, t, dxdt, SD, method="finite_difference", fd_step=2.0)
    with pytest.raises(TypeError, match="tuple"):
        jvp_tangent(lambda u, tt: {"F": u}, x_t, t, dxdt, SD)
