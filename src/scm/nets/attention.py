"""Softmax attention with an exact forward-mode JVP rule and bounded memory (paper §5.1, App. F).

PyTorch's fused attention kernels have no forward-AD formula. `attention(q, k, v)` is plain math attention
written as a custom autograd Function whose `forward`, `backward` and `jvp` all loop over blocks of queries,
so no more than `chunk × L` logits per (batch·head) ever exist at once. Each block holds complete rows of
the logit matrix, so its softmax is exact; the backward and the JVP recompute them instead of storing p (as
FlashAttention does), except when all the logits fit in one block: then the forward's p (at most
`_BLOCK_ELEMENTS` values, 16 MB in fp32) is kept for them, which costs no more memory than one block.
The tangent follows from logits x = s·QKᵀ, p = softmax(x), y = pV:

    t_x = s·(t_Q Kᵀ + Q t_Kᵀ),   t_y = (p ⊙ t_x)V − rowsum(p ⊙ t_x)·y + p·t_V         (paper §5.1, App. F)

Two backends compute it:

* "math" (CPU, float64, and wherever Triton is missing): the blocked path above. Peak extra memory: one
  block of `chunk × Lk` logits per (batch·head), at most `_BLOCK_ELEMENTS` (4M) logits over the batch, plus
  the block's probabilities and tangent logits of the same size.
* "triton" (CUDA tensors of fp16 / bf16 / fp32 with head dims ≤ 128, Triton installed:
  `pip install scm[triton]`): FlashAttention-style kernels in `scm.nets.attention_triton` that stream over
  key blocks with the online softmax. Peak: O(BLOCK_M × BLOCK_N) logits per program (≤ 64 × 64), never
  N × Nk; besides the outputs, a float32 log-sum-exp per query.

`attention` (the layer, [N, L, C]) runs PyTorch's fused `scaled_dot_product_attention` on GPUs when nothing will
differentiate the call (inference: no grad mode with inputs that require it, no forward-AD level, no functorch
transform; float64 excepted): sampling needs no tangent. Otherwise it takes the kernels on CUDA when Triton is
installed. Its forward kernel
returns O and saves the log-sum-exp; its JVP rule runs one tangent kernel from the saved O and log-sum-exp
(probabilities come out normalised, so one pass over the keys with two accumulators; the forward has already
produced O, so the fused kernel would only redo it); its backward is the exact FlashAttention-2 backward
from the log-sum-exp. On the CPU it runs the math path, unchanged. `attention_jvp(q, k, v, tq, tk, tv)`
([B, heads, N, d]) returns O and tO from one call: on "triton" from ONE fused kernel pass that carries three
accumulators (P̃V, P̃·tV + (P̃ ⊙ tS)V, rowsum(P̃ ⊙ tS)) rescaled by the running max.

Key padding masks (cross-attention to prompts padded to a fixed length): `key_mask`, bool [N, Lk] for `attention`,
[B, Nk] shared by the heads for `attention_jvp`, True on real keys. Padding keys get probability exactly 0 (their
logits are -inf on every path: math, kernels, SDPA), so the output, its tangent and its gradients equal attention
over the real keys alone, and padding keys get gradient 0. A row with no real key at all (an encoder that emits no
tokens) outputs exactly 0, with tangent 0 and gradients 0, never NaN; its log-sum-exp is -inf. The mask is not
differentiable; key_mask=None runs the unmasked code unchanged.
"""

from __future__ import annotations

import functools
import os

import torch

from scm.precision import compute_dtype, to_compute

__all__ = ["BACKENDS", "LAYER_BACKEND", "attention", "attention_jvp"]

_BLOCK_ELEMENTS = 1 << 22  # logits per block across the batch: 4M (16 MB in fp32)


def _blocks(q: torch.Tensor, k: torch.Tensor):
    n, lq, _ = q.shape
    size = max(1, min(lq, _BLOCK_ELEMENTS // max(1, n * k.shape[1])))
    return [slice(i, min(i + size, lq)) for i in range(0, lq, size)]


def _probs(q_blk: torch.Tensor, k: torch.Tensor, scale: float, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax in (at least) float32 whatever the input dtype, so every pass sees the same p. `pad` [N, Lk]
    (True on padding keys): their probability is exactly 0, and a row with every key padded is all 0."""
    logits = torch.bmm(q_blk, k.transpose(1, 2))
    logits = to_compute(logits) * scale
    if pad is None:
        return torch.softmax(logits, dim=-1).to(q_blk.dtype)
    pad = pad[:, None, :]
    p = torch.softmax(logits.masked_fill(pad, float("-inf")), dim=-1)
    return p.masked_fill(pad, 0.0).to(q_blk.dtype)  # also the NaN of an all-padding row's 0/0


def _forward_and_probs(q, k, v, scale: float, pad=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output and, when all the logits fit in one block (≤ _BLOCK_ELEMENTS), the probabilities, which the
    JVP and the backward then reuse instead of recomputing them (the same values: memory stays bounded)."""
    blocks = _blocks(q, k)
    if len(blocks) == 1:
        p = _probs(q, k, scale, pad)
        return torch.bmm(p, v), p
    out = torch.empty(*q.shape[:2], v.shape[2], dtype=v.dtype, device=v.device)
    for blk in blocks:
        out[:, blk] = torch.bmm(_probs(q[:, blk], k, scale, pad), v)
    return out, None


def _blocked_jvp(q, k, v, out, t_q, t_k, t_v, s: float, probs: torch.Tensor | None = None,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
    """The tangent of out = attention(q, k, v) along (t_q, t_k, t_v), any of them None, block by block
    (`probs`: the probabilities of a single block, from the forward; `pad`: True on padding keys)."""
    blocks = _blocks(q, k)
    t_out = torch.zeros_like(out) if len(blocks) > 1 else None
    for blk in blocks:
        p = _probs(q[:, blk], k, s, pad) if probs is None else probs
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
        if t_out is None:
            return blk_out
        t_out[:, blk] = blk_out
    return t_out


def _blocked_lse(q: torch.Tensor, k: torch.Tensor, scale: float, pad: torch.Tensor | None = None) -> torch.Tensor:
    """log Σ_j exp(scale·q_i·k_j) per query over the keys not padded (-inf where all are), float32 (float64
    for float64 inputs), block by block."""
    lse = torch.empty(q.shape[:2], dtype=compute_dtype(q), device=q.device)
    for blk in _blocks(q, k):
        logits = to_compute(torch.bmm(q[:, blk], k.transpose(1, 2))) * scale
        if pad is not None:
            logits = logits.masked_fill(pad[:, None, :], float("-inf"))
        lse[:, blk] = torch.logsumexp(logits, dim=-1)
    return lse


class _Attention(torch.autograd.Function):
    """Outputs (out, p): p is the probabilities when they fit in one block (else an empty tensor), kept for the
    JVP and the backward; not differentiable. `pad` ([N, Lk] bool, True on padding keys, or None) is neither."""

    @staticmethod
    def forward(q, k, v, scale, pad):  # every argument given: torch.compile mis-binds omitted defaults
        out, p = _forward_and_probs(q, k, v, scale, pad)
        return out, (p if p is not None else out.new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, pad = inputs
        out, p = output
        ctx.scale = scale
        ctx.has_probs = p.numel() > 0
        ctx.mark_non_differentiable(p)
        ctx.set_materialize_grads(False)  # absent tangents / gradients arrive as None, not zeros
        values = tuple(t.detach() for t in (q, k, v, out, p))  # no tangent kept alive, no graph for tangents
        ctx.save_for_backward(*values, pad)
        ctx.save_for_forward(*values, pad)

    @staticmethod
    def backward(ctx, d_out, _):
        if d_out is None:
            return (None,) * 5
        q, k, v, out, probs, pad = ctx.saved_tensors
        s = ctx.scale
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for blk in _blocks(q, k):
            p = probs if ctx.has_probs else _probs(q[:, blk], k, s, pad)
            d_o = d_out[:, blk]
            dv += torch.bmm(p.transpose(1, 2), d_o)                             # dV = pᵀ dO
            dp = torch.bmm(d_o, v.transpose(1, 2))                              # dp = dO Vᵀ
            dx = p * (dp - (d_o * out[:, blk]).sum(-1, keepdim=True))           # softmax backward
            dq[:, blk] = torch.bmm(dx, k) * s
            dk += torch.bmm(dx.transpose(1, 2), q[:, blk]) * s
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, t_q, t_k, t_v, *_):
        q, k, v, out, probs, pad = ctx.saved_tensors
        probs = probs if ctx.has_probs else None
        return _blocked_jvp(q, k, v, out, t_q, t_k, t_v, ctx.scale, probs, pad), None


class _TritonAttention(torch.autograd.Function):
    """The same op on the Triton kernels, for q, k, v of shape [N, 1, L, C]: the forward saves the
    log-sum-exp; the JVP is one pass over the keys from the saved output and log-sum-exp; the backward is
    the exact FlashAttention-2 backward from them. `blocks` (BLOCK_M, BLOCK_N) is for tests (None: per head dim);
    `key_mask` ([N, Lk] bool, True on real keys, or None) is not differentiable. The kernels are called as the
    operators scm.nets.attention_triton registers (`attention` imports it before it gets here), so that
    torch.compile sees the operators themselves, not the cached import."""

    @staticmethod
    def forward(q, k, v, scale, blocks, key_mask):  # every argument given (torch.compile: see _Attention)
        return torch.ops.scm.attention_triton_forward(q, k, v, scale, blocks, key_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, blocks, key_mask = inputs
        out, lse = output
        ctx.scale, ctx.blocks = scale, blocks
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        values = tuple(t.detach() for t in (q, k, v, out, lse))
        ctx.save_for_backward(*values, key_mask)
        ctx.save_for_forward(*values, key_mask)

    @staticmethod
    def backward(ctx, d_out, _):
        if d_out is None:
            return (None,) * 6
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.scm.attention_triton_backward(q, k, v, out, lse, d_out, ctx.scale, ctx.blocks, key_mask)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, t_q, t_k, t_v, *_):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        t_out = torch.ops.scm.attention_triton_tangent(q, k, v, out, lse, t_q, t_k, t_v, ctx.scale, ctx.blocks,
                                                      key_mask)
        return t_out, None


BACKENDS = ("auto", "math", "triton")
# "math" keeps `attention` on the blocked math path on CUDA too: a switch for comparisons, or a way round a Triton
# that fails on some machine; the environment variable SCM_ATTENTION=math sets it for a whole process.
LAYER_BACKEND = os.environ.get("SCM_ATTENTION") or "auto"  # unset or empty: auto
if LAYER_BACKEND not in ("auto", "math"):
    raise ValueError(f"SCM_ATTENTION={LAYER_BACKEND!r}: must be 'auto' or 'math'")


@functools.cache
def _triton():
    """scm.nets.attention_triton, imported on first use (so that TRITON_INTERPRET is read late)."""
    from scm.nets import attention_triton

    return attention_triton


def _on_kernels(*xs: torch.Tensor) -> bool:
    """The "auto" choice: the Triton kernels for CUDA tensors they support, when Triton is installed."""
    return all(x.is_cuda for x in xs) and _triton().available() and _triton().unsupported(*xs) is None


def _fused_for_inference(q: torch.Tensor) -> bool:
    """Where inference takes PyTorch's fused attention: on GPUs (flash / memory-efficient / cuDNN kernels), not in
    float64. Not on the CPU: there its kernel was no faster than the blocked path (tiny DiT, 64 images) and its
    results depend on the batch, while the blocked path keeps an example's output independent of the batch it is
    computed in (two processes equal one; an image depends on its seed alone)."""
    return q.is_cuda and q.dtype != torch.float64


def _derivatives_wanted(*xs: torch.Tensor) -> bool:
    """Whether this call may be differentiated: a backward (grad mode with an input that requires it), or a
    tangent (a forward-AD dual level or a functorch transform such as torch.func.jvp is active)."""
    from torch.autograd import forward_ad

    return (torch.is_grad_enabled() and any(x.requires_grad for x in xs)) or forward_ad._current_level >= 0 \
        or torch._C._functorch.maybe_current_level() is not None


def _common_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    return dtype


def _check_mask(key_mask: torch.Tensor, k: torch.Tensor, name: str) -> None:
    """key_mask: bool [batch, keys] on k's device (batch = k.shape[0], keys = k.shape[-2])."""
    want = (k.shape[0], k.shape[-2])
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != want or key_mask.device != k.device:
        raise ValueError(f"{name}: key_mask must be a bool tensor of shape {list(want)} on {k.device} (True on real "
                         f"keys); got {key_mask.dtype} {tuple(key_mask.shape)} on {key_mask.device}")


def _fused(q, k, v, scale: float, key_mask: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's fused attention; a row whose keys are all padding gives 0 (SDPA's own answer would be NaN: such
    rows attend to every key, then are zeroed)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if key_mask is None:
        return sdpa(q, k, v, scale=scale)
    some = key_mask.any(-1, keepdim=True)                                    # [N, 1]
    out = sdpa(q, k, v, attn_mask=(key_mask | ~some)[:, None, :], scale=scale)
    return out.masked_fill(~some[:, :, None], 0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale·q kᵀ) v for q [N, Lq, C], k [N, Lk, C], v [N, Lk, Cv]; scale defaults to 1/sqrt(C).

    key_mask: optional bool [N, Lk], True on real keys, False on padding: padding keys get probability exactly 0,
    and a row whose keys are all padding outputs 0 (tangent 0, gradients 0). Not differentiable.
    Exact under backward AD, `torch.autograd.forward_ad` and `torch.func.jvp`. On CUDA with Triton installed
    (fp16 / bf16 / fp32, C and Cv ≤ 128) it runs the Triton kernels, elsewhere the blocked math path.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"attention expects 3-D q, k, v of shape [N, L, C]; got {shapes}")
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_mask is not None:
        _check_mask(key_mask, k, "attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dtype = _common_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if LAYER_BACKEND == "auto" and _fused_for_inference(q) and not _derivatives_wanted(q, k, v):
        # inference (sampling, evaluation, serving, the sCD teacher): no tangent, no backward, so PyTorch's fused
        # kernels (flash / memory-efficient / cuDNN) serve
        return _fused(q, k, v, scale, key_mask)
    if q.is_cuda and LAYER_BACKEND == "auto" and _on_kernels(q, k, v):
        q, k, v = (x.unsqueeze(1).contiguous() for x in (q, k, v))  # one copy, not one per kernel (U-Net views)
        mask = None if key_mask is None else key_mask.contiguous()
        return _TritonAttention.apply(q, k, v, scale, None, mask)[0].squeeze(1)
    return _Attention.apply(q, k, v, scale, None if key_mask is None else ~key_mask)[0]


def attention_jvp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tq: torch.Tensor | None, tk: torch.Tensor | None, tv: torch.Tensor | None,
    *, scale: float | None = None, backend: str = "auto", return_lse: bool = False,
    key_mask: torch.Tensor | None = None,
):
    """(O, tO) of O = softmax(scale·Q Kᵀ)V along the tangents (tQ, tK, tV) (any may be None), in one call.

    Shapes: q [B, heads, N, d], k [B, heads, Nk, d], v [B, heads, Nk, dv]; scale defaults to 1/sqrt(d).
    backend: "math" (the blocked exact path; float64 too), "triton" (one fused kernel pass computing O and
    tO together; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or "auto" (Triton for CUDA tensors
    it supports when Triton is installed, else math). return_lse: also return the row log-sum-exp of
    scale·Q Kᵀ [B, heads, N] (float32; float64 for float64 math). key_mask: optional bool [B, Nk] (the same
    for every head), True on real keys: padding keys get probability 0 and are left out of the log-sum-exp; a
    row whose keys are all padding gives O = 0, tO = 0 and log-sum-exp -inf. A functional primitive: its
    outputs carry no autograd history (`attention` is the differentiable op).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"attention_jvp expects 4-D q, k, v of shape [B, heads, N, d]; got {shapes}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, t, x in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"attention_jvp: {name} has shape {tuple(t.shape)}, its primal {tuple(x.shape)}")
    if key_mask is not None:
        _check_mask(key_mask, k, "attention_jvp")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dtype = _common_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    tq, tk, tv = (None if t is None else t.to(dtype) for t in (tq, tk, tv))
    if backend == "triton":
        if not _triton().available():
            raise RuntimeError("attention backend 'triton' needs Triton: pip install scm[triton]")
        reason = _triton().unsupported(q, k, v, *(t for t in (tq, tk, tv) if t is not None))
        if reason is not None:
            raise RuntimeError(f"attention backend 'triton': {reason}; the 'math' backend takes any tensors "
                               "(Triton itself: pip install scm[triton])")
    elif backend == "auto":
        backend = "triton" if q.is_cuda and _on_kernels(q, k, v) else "math"

    with torch.no_grad():
        if backend == "triton":
            out, t_out, lse = _triton().jvp_op(q, k, v, tq, tk, tv, scale, None, key_mask)
            return (out, t_out, lse) if return_lse else (out, t_out)
        b, h = q.shape[:2]
        fold = lambda a: None if a is None else a.reshape(b * h, *a.shape[2:])  # noqa: E731
        q3, k3, v3 = fold(q), fold(k), fold(v)
        pad = None if key_mask is None else fold((~key_mask)[:, None].expand(b, h, -1))
        out, probs = _forward_and_probs(q3, k3, v3, scale, pad)
        t_out = _blocked_jvp(q3, k3, v3, out, fold(tq), fold(tk), fold(tv), scale, probs, pad)
        unfold = lambda a: a.reshape(b, h, *a.shape[1:])  # noqa: E731
        if return_lse:
            return unfold(out), unfold(t_out), unfold(_blocked_lse(q3, k3, scale, pad))
        return unfold(out), unfold(t_out)
