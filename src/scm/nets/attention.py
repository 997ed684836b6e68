"""Softmax attention with an exact forward-mode JVP rule and bounded memory (paper §5.1, App. F).

PyTorch's fused attention kernels have no forward-AD formula. `attention(q, k, v)` is plain math attention
written as a custom autograd Function whose `forward`, `backward` and `jvp` all loop over blocks of queries,
so no more than `chunk × L` logits per (batch·head) ever exist at once. Each block holds complete rows of
the logit matrix, so its softmax is exact; the backward recomputes them instead of storing p (as
FlashAttention does). The tangent follows from logits x = s·QKᵀ, p = softmax(x), y = pV:

    t_x = s·(t_Q Kᵀ + Q t_Kᵀ),   t_y = (p ⊙ t_x)V − rowsum(p ⊙ t_x)·y + p·t_V         (paper §5.1, App. F)
"""

from __future__ import annotations

import torch

from scm.precision import to_compute

__all__ = ["attention"]

_BLOCK_ELEMENTS = 1 << 22  # logits per block across the batch: 4M (16 MB in fp32)


def _blocks(q: torch.Tensor, k: torch.Tensor):
    n, lq, _ = q.shape
    size = max(1, min(lq, _BLOCK_ELEMENTS // max(1, n * k.shape[1])))
    return [slice(i, min(i + size, lq)) for i in range(0, lq, size)]


def _probs(q_blk: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax in (at least) float32 whatever the input dtype, so every pass sees the same p."""
    logits = torch.bmm(q_blk, k.transpose(1, 2))
    logits = to_compute(logits) * scale
    return torch.softmax(logits, dim=-1).to(q_blk.dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, scale):
        out = torch.empty(*q.shape[:2], v.shape[2], dtype=v.dtype, device=v.device)
        for blk in _blocks(q, k):
            out[:, blk] = torch.bmm(_probs(q[:, blk], k, scale), v)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # absent tangents / gradients arrive as None, not zeros
        values = tuple(t.detach() for t in (q, k, v, output))  # no tangent kept alive, no graph for tangents
        ctx.save_for_backward(*values)
        ctx.save_for_forward(*values)

    @staticmethod
    def backward(ctx, d_out):
        if d_out is None:
            return None, None, None, None
        q, k, v, out = ctx.saved_tensors
        s = ctx.scale
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for blk in _blocks(q, k):
            p = _probs(q[:, blk], k, s)
            d_o = d_out[:, blk]
            dv += torch.bmm(p.transpose(1, 2), d_o)                             # dV = pᵀ dO
            dp = torch.bmm(d_o, v.transpose(1, 2))                              # dp = dO Vᵀ
            dx = p * (dp - (d_o * out[:, blk]).sum(-1, keepdim=True))           # softmax backward
            dq[:, blk] = torch.bmm(dx, k) * s
            dk += torch.bmm(dx.transpose(1, 2), q[:, blk]) * s
        return dq, dk, dv, None

    @staticmethod
    def jvp(ctx, t_q, t_k, t_v, _):
        q, k, v, out = ctx.saved_tensors
        s = ctx.scale
        t_out = torch.zeros_like(out)
        for blk in _blocks(q, k):
            p = _probs(q[:, blk], k, s)
            t_x = 0
            if t_q is not None:
                t_x = torch.bmm(t_q[:, blk], k.transpose(1, 2))
            if t_k is not None:
                t_x = t_x + torch.bmm(q[:, blk], t_k.transpose(1, 2))
            a = p * (t_x * s) if t_q is not None or t_k is not None else None
            blk_out = torch.zeros_like(out[:, blk])
            if a is not None:
                blk_out = torch.bmm(a, v) - a.sum(-1, keepdim=True) * out[:, blk]
            if t_v is not None:
                blk_out = blk_out + torch.bmm(p, t_v)
            t_out[:, blk] = blk_out
        return t_out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale·q kᵀ) v for q [N, Lq, C], k [N, Lk, C], v [N, Lk, Cv]; scale defaults to 1/sqrt(C).

    Exact under backward AD, `torch.autograd.forward_ad` and `torch.func.jvp`.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"attention expects 3-D q, k, v of shape [N, L, C]; got {shapes}")
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    return _Attention.apply(q.to(dtype), k.to(dtype), v.to(dtype), scale)
