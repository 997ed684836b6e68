"""The time derivative of the network along the PF-ODE, cos t·sin t·dF/dt, by one forward-mode JVP.

sCM's target needs the total derivative dF⁻/dt = ∇_x F·dx_t/dt + ∂_t F (eq. 6). Forward-mode AD gets it
in one pass at about the cost of a forward, without storing activations. The paper's rearrangement (§5.1)
folds the factor cos t·sin t that the loss needs into the tangent, so no intermediate tangent grows as
t → 0 or t → π/2 (where dF/dt itself may overflow in low precision):

    JVP of (u, t) ↦ F(u, t) at (x_t/σ_d, t) with tangent (cos t·sin t·dx_t/dt / σ_d, cos t·sin t)
      = cos t·sin t·(∇_u F·d(x_t/σ_d)/dt + ∂_t F) = cos t·sin t·dF/dt =: JF.

(The paper's tangent (cos t sin t·dx_t/dt, σ_d cos t sin t) of §5.1 yields σ_d·JF. We return JF, and
the target multiplies by σ_d: g = … − r·(cos t·sin t·x_t + σ_d·JF).)

Four methods compute it, all with one call shape:
- "forward_ad" (default): `torch.autograd.forward_ad` dual tensors; works with data-dependent code.
- "func": `torch.func.jvp`.
- "finite_difference": a central difference along the same tangent, for models without forward-mode
  AD. Error: truncation h²/6·|d³F/dh³| plus rounding ≈ ε_mach·|F|/h, minimised near h = ε_mach^(1/3)
  (≈ 5e-3 in float32, 6e-6 in float64) where the relative error is about ε_mach^(2/3) (≈ 2e-5 in float32,
  4e-11 in float64) for a smooth, O(1)-scaled F. It costs three network calls (F, and F at ±h), replays
  the RNG so all three see the same dropout mask, and stays inside [0, π/2] for h < 1 because the time
  tangent cos t·sin t vanishes at both ends. In half precision its error is large (ε^(2/3) ≈ 4e-2 in bf16).
- "discrete": the backward difference of discrete-time consistency models, [F(x_t, t) − F(x_t − Δt·dx/dt, t − Δt)]/Δt
  with a fixed step Δt = `fd_step` (radians; e.g. (π/2)/N for N steps), clipped to t. With it the sCM loss is a
  discrete-time CM with the same tricks (paper §4.2, Fig. 5): its gradient tends to the continuous one as Δt → 0.

No autograd graph is kept for JF, and no tangent survives the call: forward-mode tangents are not stopped
by `torch.no_grad` (PyTorch's forward-mode AD ignores it), so they are confined to a dual level (or a
`torch.func` transform) that closes before this function returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

from scm._checks import check_positive, check_same_shape, check_t
from scm._rng import rng_replayer
from scm.precision import compute_dtype
from scm.trigflow import expand

__all__ = ["METHODS", "jvp_tangent"]

METHODS = ("forward_ad", "func", "finite_difference", "discrete")


def _precision_context(precision: torch.dtype | None, device_type: str):
    """None: keep the caller's autocast state; float32/float64: autocast off; a half type: autocast to it."""
    if precision is None:
        return contextlib.nullcontext()
    if precision in (torch.float32, torch.float64):
        return torch.autocast(device_type, enabled=False)
    if precision in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type, dtype=precision)
    raise ValueError(f"precision must be None, torch.float32/float64 or torch.bfloat16/float16, got {precision!r}")


def _split(out):
    """A network returns F or a tuple (F, *aux)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], tuple(out[1:])
    raise TypeError(f"fn must return a tensor F or a tuple (F, ...), got {type(out).__name__}")


def jvp_tangent(
    fn: Callable,
    x_t: torch.Tensor,
    t: torch.Tensor,
    dxdt: torch.Tensor,
    sigma_d: float,
    *,
    method: str = "forward_ad",
    precision: torch.dtype | None = None,
    primal_grad: bool = False,
    rearranged: bool = True,
    fd_step: float | None = None,
    **cond,
):
    """F = fn(x_t/σ_d, t, **cond) and JF = cos t·sin t·dF/dt along dx_t/dt, from one JVP pass.

    Args:
        fn: the network, called as fn(x_t/σ_d, t, **cond); returns F, or a tuple (F, *aux).
        x_t, dxdt: same shape [B, ...]; t: [B] in [0, π/2]; sigma_d: the data std σ_d.
        method: "forward_ad", "func" or "finite_difference" (module docstring).
        precision: dtype of the tangent pass: None keeps the caller's autocast state; torch.float32 runs the
            pass without autocast (fp32 tangents inside a bf16 training step); torch.bfloat16/float16 run it
            under autocast to that type.
        primal_grad: keep the autograd graph of F (one fused pass serves the tangent and the training
            forward). JF is always detached.
        rearranged: use the paper's rearranged tangent (default). False takes the naive JVP with tangent
            (dx_t/dt/σ_d, 1) and multiplies by cos t·sin t afterwards: an ablation of §5.1's rearrangement,
            which matters in low precision.
        fd_step: the step h of the finite difference (default ε_mach^(1/3) of the working dtype).

    Returns:
        (F, JF) in x_t's dtype, or (F, JF, aux) when fn returns a tuple (aux: its other outputs, primal).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_same_shape(x_t=x_t, dxdt=dxdt)
    check_t(t, x_t)
    check_positive("sigma_d", sigma_d)

    work = compute_dtype(x_t)
    if precision in (torch.float32, torch.float64):
        work = precision
    ct_st = torch.cos(t.to(work)) * torch.sin(t.to(work))  # cos t·sin t, shape [B]
    u = (x_t.to(work) / sigma_d).contiguous()  # dual tensors need a layout that owns its memory
    t_in = t.to(work).contiguous()
    if rearranged:
        tx = (expand(ct_st, u) * dxdt.to(work) / sigma_d).contiguous()
        tt = ct_st.contiguous()
    else:
        tx = (dxdt.to(work) / sigma_d).contiguous()
        tt = torch.ones_like(t_in)

    grad_ctx = contextlib.nullcontext() if primal_grad else torch.no_grad()
    with grad_ctx, _precision_context(precision, x_t.device.type):
        if method == "forward_ad":
            with fwAD.dual_level():
                F, aux = _split(fn(fwAD.make_dual(u, tx), fwAD.make_dual(t_in, tt), **cond))
                F, dF = fwAD.unpack_dual(F)
                aux = None if aux is None else tuple(fwAD.unpack_dual(a).primal for a in aux)
                dF = torch.zeros_like(F) if dF is None else dF.detach()
        elif method == "func":
            out, dout = torch.func.jvp(lambda a, b: fn(a, b, **cond), (u, t_in), (tx, tt))
            F, aux = _split(out)
            dF = _split(dout)[0].detach()
        elif method == "discrete":
            F, aux, dF = _backward_difference(fn, u, t_in, dxdt.to(work) / sigma_d, ct_st, fd_step, **cond)
        else:
            F, aux, dF = _finite_difference(fn, u, t_in, tx, tt, fd_step, primal_grad, **cond)

    if not rearranged and method != "discrete":
        dF = expand(ct_st, dF).to(dF.dtype) * dF
    F, JF = F.to(x_t.dtype), dF.to(x_t.dtype)
    return (F, JF) if aux is None else (F, JF, aux)


def _finite_difference(fn, u, t, tx, tt, h, primal_grad, **cond):
    """Central difference [F(u + h·tx, t + h·tt) − F(u − h·tx, t − h·tt)]/(2h), same dropout mask for all."""
    if h is None:
        h = torch.finfo(u.dtype).eps ** (1 / 3)
    if not 0 < h < 1:
        raise ValueError(f"fd_step must lie in (0, 1), got {h!r}")
    rewind = rng_replayer(u.device)
    F, aux = _split(fn(u, t, **cond))
    with torch.no_grad():
        rewind()
        F_plus = _split(fn(u + h * tx, t + h * tt, **cond))[0]
        rewind()
        F_minus = _split(fn(u - h * tx, t - h * tt, **cond))[0]
    dF = (F_plus.to(u.dtype) - F_minus.to(u.dtype)) / (2 * h)
    return F, aux, dF.detach()


def _backward_difference(fn, u, t, du, ct_st, dt, **cond):
    """cos t·sin t·[F(u, t) − F(u − Δt·du, t − Δt)]/Δt with Δt = min(dt, t), the same dropout mask for both."""
    if dt is None or not dt > 0:
        raise ValueError(f"method='discrete' needs fd_step = Δt > 0 (radians), got {dt!r}")
    step = torch.clamp(t, max=dt)
    rewind = rng_replayer(u.device)
    F, aux = _split(fn(u, t, **cond))
    with torch.no_grad():
        rewind()
        F_prev = _split(fn(u - expand(step, u) * du, t - step, **cond))[0]
    dF = (F.detach().to(u.dtype) - F_prev.to(u.dtype)) / expand(step, u)
    return F, aux, (expand(ct_st, dF) * dF).detach()
