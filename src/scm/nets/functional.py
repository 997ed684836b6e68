"""Primitive ops with hand-written JVP rules, so that a tangent pass costs little more than a forward.

PyTorch's generic forward-mode formulas are exact but wasteful for what a U-Net does most: conv2d runs a
third convolution for the (absent) weight tangent, scalar multiplications and divisions go through Python
decompositions, and a pixel norm expands into a dozen tangent ops. The same holds for the transformer's
linear layers, layer norm, modulation, gated residuals and GELU (the ops after the U-Net's). Each op here
is an `autograd.Function` with `forward`, `setup_context`, `backward` and `jvp`, valid under backward AD,
`torch.autograd.forward_ad` and `torch.func.jvp`; absent tangents arrive as None (not zeros) and are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scm.precision import to_compute

__all__ = [
    "clip",
    "conv2d",
    "gated_residual",
    "gelu",
    "lincomb",
    "linear",
    "modulate",
    "modulated_layer_norm",
    "pixel_norm",
    "scaled_cat",
    "silu",
    "upsample2x",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _save(ctx, *tensors: torch.Tensor) -> None:
    """Save values for the backward and the JVP rule, detached: no forward-mode tangent is kept alive with
    them until the backward, and a tangent computed from them while the primal is being recorded for
    backward (the fused pass) records no autograd graph of its own."""
    values = tuple(t.detach() for t in tensors)
    ctx.save_for_backward(*values)
    ctx.save_for_forward(*values)


class _Conv2d(torch.autograd.Function):
    """Stride-1 conv2d. Its JVP skips the weight-tangent convolution when the weight has no tangent."""

    @staticmethod
    def forward(x, w, padding):
        return F.conv2d(x, w, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, padding = inputs
        ctx.padding = padding
        ctx.set_materialize_grads(False)
        _save(ctx, x, w)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x, w = ctx.saved_tensors
        p = ctx.padding
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        return gx, gw, None

    @staticmethod
    def jvp(ctx, t_x, t_w, _):
        x, w = ctx.saved_tensors
        out = None if t_x is None else F.conv2d(t_x, w, padding=ctx.padding)
        return _add(out, None if t_w is None else F.conv2d(x, t_w, padding=ctx.padding))


def conv2d(x: torch.Tensor, w: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """Stride-1 2-D convolution (honours autocast: runs in its dtype)."""
    dtype = _compute_dtype(x)
    return _Conv2d.apply(x.to(dtype), w.to(dtype), padding)


class _PixelNorm(torch.autograd.Function):
    """y = x·r, r = (mean_dim(x²) + eps)^(−1/2). Its Jacobian r·(I − y yᵀ/D) is symmetric, so the JVP and
    the backward share one formula: r·(v − y·mean_dim(y·v))."""

    @staticmethod
    def forward(x, dim, eps):
        xf = to_compute(x)
        r = torch.rsqrt(xf.square().mean(dim=dim, keepdim=True) + eps).to(x.dtype)
        return x * r, r

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.set_materialize_grads(False)
        y, r = output
        ctx.mark_non_differentiable(r)
        _save(ctx, y, r)

    @staticmethod
    def _apply_jacobian(y, r, v, dim):
        return r * torch.addcmul(v, y, (y * v).mean(dim=dim, keepdim=True), value=-1)

    @staticmethod
    def backward(ctx, grad, _):
        if grad is None:
            return None, None, None
        return _PixelNorm._apply_jacobian(*ctx.saved_tensors, grad, ctx.dim), None, None

    @staticmethod
    def jvp(ctx, t_x, _dim, _eps):
        if t_x is None:
            return None, None
        return _PixelNorm._apply_jacobian(*ctx.saved_tensors, t_x, ctx.dim), None


def pixel_norm(x: torch.Tensor, dim=1, eps: float = 1e-8) -> torch.Tensor:
    """x scaled to unit RMS over `dim` (an int or tuple); smooth at x = 0 (eps inside the root)."""
    return _PixelNorm.apply(x, dim, eps)[0]


class _LinComb(torch.autograd.Function):
    """α·a + β·b for constants α, β (a linear map: the JVP is the same map on the tangents)."""

    @staticmethod
    def forward(a, b, alpha, beta):
        return a * alpha + b * beta  # not add(…, alpha=): inductor (torch 2.13, CPU) drops it after a matmul

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.alpha, ctx.beta = inputs[2], inputs[3]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        return grad * ctx.alpha, grad * ctx.beta, None, None

    @staticmethod
    def jvp(ctx, t_a, t_b, _alpha, _beta):
        if t_a is None:
            return None if t_b is None else t_b * ctx.beta
        return t_a * ctx.alpha if t_b is None else t_a * ctx.alpha + t_b * ctx.beta


def lincomb(a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _LinComb.apply(a, b, float(alpha), float(beta))


class _ScaledCat(torch.autograd.Function):
    """cat([α·a, β·b], dim=1) for constants α, β."""

    @staticmethod
    def forward(a, b, alpha, beta):
        return torch.cat([a * alpha, b * beta], dim=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, _, ctx.alpha, ctx.beta = inputs
        ctx.split = a.shape[1]
        ctx.shapes = (inputs[0].shape, inputs[1].shape)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        return grad[:, : ctx.split] * ctx.alpha, grad[:, ctx.split :] * ctx.beta, None, None

    @staticmethod
    def jvp(ctx, t_a, t_b, _alpha, _beta):
        if t_a is None and t_b is None:
            return None
        sa, sb = ctx.shapes
        ta = t_a * ctx.alpha if t_a is not None else torch.zeros(sa, dtype=t_b.dtype, device=t_b.device)
        tb = t_b * ctx.beta if t_b is not None else torch.zeros(sb, dtype=t_a.dtype, device=t_a.device)
        return torch.cat([ta, tb], dim=1)


def scaled_cat(a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _ScaledCat.apply(a, b, float(alpha), float(beta))


class _Clip(torch.autograd.Function):
    """clamp(x, −c, c), derivative 1 where |x| < c and 0 elsewhere. The mask is rebuilt from the output
    (|y| < c) only when a backward or a JVP asks for it: a plain forward pays nothing, and nothing but the
    output (which the next layer keeps anyway) is saved."""

    @staticmethod
    def forward(x, c):
        return x.clamp(-c, c)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.c = inputs[1]
        ctx.set_materialize_grads(False)
        _save(ctx, output)

    @staticmethod
    def _mask(ctx, v):
        (y,) = ctx.saved_tensors
        return v * (y.abs() < ctx.c)

    @staticmethod
    def backward(ctx, grad):
        return (None if grad is None else _Clip._mask(ctx, grad)), None

    @staticmethod
    def jvp(ctx, t_x, _c):
        return None if t_x is None else _Clip._mask(ctx, t_x)


def clip(x: torch.Tensor, c: float) -> torch.Tensor:
    return _Clip.apply(x, float(c))


def _activation(name: str, f, f_backward, doc: str) -> type[torch.autograd.Function]:
    """An elementwise activation f whose JVP and backward are one native kernel each, `f_backward(g, x)` =
    g·f'(x) (PyTorch's own formulas go through several ops)."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        _save(ctx, inputs[0])

    def forward(x):  # one input (F.silu and F.gelu take optional arguments too)
        return f(x)

    def derivative(ctx, g):
        return None if g is None else f_backward(g, ctx.saved_tensors[0])

    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(derivative), "jvp": staticmethod(derivative)})


_SiLU = _activation("_SiLU", F.silu, torch.ops.aten.silu_backward,
                    "x·sigmoid(x); derivative via the native silu_backward kernel (one op for the tangent).")


def silu(x: torch.Tensor) -> torch.Tensor:
    return _SiLU.apply(x)


class _Modulate(torch.autograd.Function):
    """y·s + b for y [B, C, H, W] and per-channel s, b [B, C, 1, 1] (the adaptive double norm's affine)."""

    @staticmethod
    def forward(y, s, b):
        return torch.addcmul(b, y, s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, s, _ = inputs
        ctx.set_materialize_grads(False)
        _save(ctx, y, s)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        y, s = ctx.saved_tensors
        gs = (grad * y).sum(dim=(2, 3), keepdim=True) if ctx.needs_input_grad[1] else None
        gb = grad.sum(dim=(2, 3), keepdim=True) if ctx.needs_input_grad[2] else None
        return grad * s, gs, gb

    @staticmethod
    def jvp(ctx, t_y, t_s, t_b):
        y, s = ctx.saved_tensors
        out = None if t_y is None else t_y * s
        out = _add(out, None if t_s is None else y * t_s)
        return _add(out, t_b)


def modulate(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _Modulate.apply(y, s, b)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour ×2 upsampling as a broadcast view and one copy (F.interpolate is several times
    slower on CPU, and so is its tangent)."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


# -- ops of the transformer (scm.nets.dit) ------------------------------------------------------------------
# Their JVP rules write into the one fresh tensor they return (in-place updates of their own temporaries):
# fewer full-size allocations (on CPU a fresh allocation also costs page faults).
def _full(t: torch.Tensor, shape) -> torch.Tensor:
    """A broadcastable tangent (e.g. a bias's) as an owned tensor of the output's shape."""
    return t if t.shape == shape else t.expand(shape).contiguous()


class _Linear(torch.autograd.Function):
    """x Wᵀ + b over the last dim. Its JVP is t_x Wᵀ (+ x t_Wᵀ + t_b only when the weights carry tangents):
    PyTorch's own forward-AD formula for linear costs about 3.7× a forward on CPU (measured) where this costs 2×."""

    @staticmethod
    def forward(x, w, b):
        return F.linear(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.set_materialize_grads(False)
        ctx.has_bias, ctx.out_shape = b is not None, output.shape
        _save(ctx, x, w)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x, w = ctx.saved_tensors
        gx = grad @ w if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb

    @staticmethod
    def jvp(ctx, t_x, t_w, t_b):
        x, w = ctx.saved_tensors
        if t_x is not None:
            out = F.linear(t_x, w, t_b)
            return out if t_w is None else out.add_(F.linear(x, t_w))
        if t_w is not None:
            return F.linear(x, t_w, t_b)
        return None if t_b is None else _full(t_b, ctx.out_shape)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b (honours autocast: runs in its dtype)."""
    dtype = _compute_dtype(x)
    return _Linear.apply(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


class _ModulatedLayerNorm(torch.autograd.Function):
    """y = n·(g·s) + g·b with n = LayerNorm(x) over the last dim without affine, per-example s and b
    (broadcast over tokens, e.g. [B, 1, C]; either may be None: no scaling, no shift) and a constant gain g. With
    r = 1/sqrt(var(x) + eps) the Jacobian of n is the symmetric r·(I − 11ᵀ/D − n nᵀ/D), so the JVP and the
    backward share one formula: r·(v − mean(v) − n·mean(n·v))."""

    @staticmethod
    def forward(x, s, b, eps, gain):
        n, _, r = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)  # r in float32 (at least)
        if s is not None:
            out = n * (s * gain if gain != 1 else s)
            if b is not None:
                out = out.add_(b * gain if gain != 1 else b)  # no alpha=: see _LinComb
        elif b is not None:
            out = n + (b * gain if gain != 1 else b)
        else:
            out = n.clone()
        return out, n, r

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, s, b, _, ctx.gain = inputs
        out, n, r = output
        ctx.mark_non_differentiable(n, r)
        ctx.set_materialize_grads(False)
        ctx.out_shape = out.shape
        ctx.s_shape, ctx.b_shape = (None if s is None else s.shape), (None if b is None else b.shape)
        _save(ctx, n, r, *(() if s is None else (s,)))  # r in float32 for half-precision x (as the kernels want)

    @staticmethod
    def _apply_jacobian(n, r, v):
        """r·(v − mean(v) − n·mean(n·v)), a fresh tensor: the native layer-norm backward kernel (one pass) fed the
        normalized n with mean 0 and scale 1 gives the bracket."""
        zero = torch.zeros_like(r)
        j = torch.ops.aten.native_layer_norm_backward(v, n, (n.shape[-1],), zero, zero + 1, None, None,
                                                      [True, False, False])[0]
        return j.mul_(r)

    @staticmethod
    def backward(ctx, grad, _n, _r):
        if grad is None:
            return None, None, None, None, None
        n, r, *s = ctx.saved_tensors
        g = ctx.gain
        gx = gs = gb = None
        if ctx.needs_input_grad[0]:
            gx = _ModulatedLayerNorm._apply_jacobian(n, r, grad * (s[0] * g) if s else grad)
        if s and ctx.needs_input_grad[1]:
            gs = (grad * n).sum_to_size(ctx.s_shape).mul_(g)
        if ctx.b_shape is not None and ctx.needs_input_grad[2]:
            gb = grad.sum_to_size(ctx.b_shape) * g
        return gx, gs, gb, None, None

    @staticmethod
    def jvp(ctx, t_x, t_s, t_b, _eps, _gain):
        n, r, *s = ctx.saved_tensors
        g = ctx.gain
        out = None
        if t_x is not None:
            out = _ModulatedLayerNorm._apply_jacobian(n, r, t_x)
            out = out.mul_(s[0] * g) if s else out
        if t_s is not None:
            out = n * (t_s * g) if out is None else out.addcmul_(n, t_s, value=g)
        if t_b is not None:
            out = _full(t_b * g, ctx.out_shape) if out is None else out.add_(t_b * g)
        return out, None, None


def modulated_layer_norm(x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                         eps: float = 1e-6, gain: float = 1.0) -> torch.Tensor:
    """LayerNorm(x)·(gain·scale) + gain·shift over the last dim (no learned affine); scale and shift broadcast
    against x (per example: [B, 1, C] for tokens [B, L, C]) and are cast to x's dtype. Either may be None (no
    scaling: LayerNorm(x) + gain·shift; no shift)."""
    s = None if scale is None else scale.to(x.dtype)
    b = None if shift is None else shift.to(x.dtype)
    return _ModulatedLayerNorm.apply(x, s, b, float(eps), float(gain))[0]


class _GatedResidual(torch.autograd.Function):
    """x + g·h with a per-example gate g broadcast over tokens (adaLN-Zero's gated residual branch)."""

    @staticmethod
    def forward(x, g, h):
        return torch.addcmul(x, g, h)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, g, h = inputs
        ctx.set_materialize_grads(False)
        ctx.shapes = (x.shape, g.shape, output.shape)
        _save(ctx, g, h)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        g, h = ctx.saved_tensors
        gx = grad.sum_to_size(ctx.shapes[0]) if ctx.needs_input_grad[0] else None
        gg = (grad * h).sum_to_size(ctx.shapes[1]) if ctx.needs_input_grad[1] else None
        gh = (grad * g).sum_to_size(h.shape) if ctx.needs_input_grad[2] else None
        return gx, gg, gh

    @staticmethod
    def jvp(ctx, t_x, t_g, t_h):
        g, h = ctx.saved_tensors
        shape = ctx.shapes[2]
        if t_h is not None:
            out = _full(g * t_h if t_x is None else torch.addcmul(t_x, g, t_h), shape)
        elif t_x is not None:
            out = _full(t_x, shape)
            if t_g is not None and out is t_x:
                out = out.clone()  # about to be updated in place: not the caller's tangent
        else:
            out = None
        if t_g is not None:
            out = t_g * h if out is None else out.addcmul_(t_g, h)
        return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + gate·h (gate broadcast against h, e.g. [B, 1, C] over tokens)."""
    return _GatedResidual.apply(x, gate, h)


_GELU = _activation("_GELU", F.gelu, torch.ops.aten.gelu_backward,
                    "GELU x·Φ(x) (exact, erf form); derivative via the native gelu_backward kernel. DiT uses the tanh "
                    "approximation, which on CPU costs about 5× as much (forward) and 2.5× (derivative) and buys "
                    "nothing here.")


def gelu(x: torch.Tensor) -> torch.Tensor:
    return _GELU.apply(x)
