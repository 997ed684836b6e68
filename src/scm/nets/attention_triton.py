"""Triton kernels for softmax attention and its JVP, FlashAttention-style (paper §5.1, App. F).

Optional: this module imports without Triton (the kernels are then simply not defined; `available()` says
so). Install the extra with `pip install scm[triton]`. All tensors are [B, heads, N, d]; keys and values
have their own length Nk (cross-attention) and values their own width. Triton reads the environment variable
TRITON_INTERPRET when a kernel is defined, so the interpreter (CPU tensors) must be switched on before this
module is first imported.

Kernels (one program per block of BLOCK_M queries of one (batch, head); each streams over key blocks of
BLOCK_N with the online softmax, so no program holds more than BLOCK_M × BLOCK_N logits and nothing of size
N × Nk ever exists; the extra memory is the output, its tangent and the log-sum-exp, O(N·d)):

* `_fwd_kernel`: O = softmax(S)V with S = scale·QKᵀ, the log-sum-exp of each row of S (kept for the
  backward and the tangent) and, in the same pass when tangents are given, the tangent
  tO = (P̃·tV + (P̃⊙tS)·V)/l − (rowsum(P̃⊙tS)/l)·O with tS = scale·(tQ Kᵀ + Q tKᵀ), P̃ = exp(S − m) and
  l = rowsum(P̃). Three accumulators (P̃V, P̃·tV + (P̃⊙tS)V, rowsum(P̃⊙tS)) are rescaled by the running max
  m exactly as FlashAttention rescales its one.
* `_tangent_kernel`: tO alone from a saved O and log-sum-exp (P = exp(S − lse) is normalised up front, so
  no rescaling): what `attention`'s autograd Function runs for its JVP, its forward having computed O.
* `_bwd_dkdv_kernel` / `_bwd_dq_kernel`: the exact FlashAttention-2 backward from the log-sum-exp
  (dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = scale·dS K, dK = scale·dSᵀ Q), one kernel over key
  blocks and one over query blocks, so no atomics.

Key padding mask: every kernel takes an optional bool [B, Nk] mask (True on real keys, shared by the heads),
compiled in only when given (the constexpr HAS_MASK; without it the kernels are the unmasked ones). Padding keys
get logit -inf in the online softmax and probability 0 in the lse-based passes. A row with no real key keeps
m = -inf and l = 0: the kernels then use 0 as the reference max (no exp2(-inf + inf) = NaN) and divide by 1, so O,
tO, dQ and the row's share of dK, dV are exactly 0, and its lse is -inf.

Precision: products run on tensor cores in the input dtype (fp16 / bf16; probabilities cast to it before
their product with V, as FlashAttention does) with float32 accumulators, softmax statistics and
log-sum-exp. For float32 inputs `tl.dot` uses input_precision "ieee" (exact fp32 products, results within
~1e-6 of the math path) unless `torch.backends.cuda.matmul.allow_tf32` is set, which switches to "tf32"
like every torch matmul (≈1e-3 relative). Head dims up to 128 are padded to a power of two ≥ 16 (72 → 128)
and masked, as are the block edges of N and Nk.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

import torch

from scm.nets import attention_tuning as tuning

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra is not installed
    triton = None

__all__ = ["MAX_HEAD_DIM", "attention_backward", "attention_forward", "attention_tangent", "available",
           "backward_op", "first_choice", "forward_op", "interpreting", "jvp_op", "tangent_op", "unsupported"]

MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INSTALL = "pip install scm[triton]"
_MAX_GRID_Y = 65535


def available() -> bool:
    """Whether Triton imported (the kernels exist)."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1): CPU tensors, for tests only."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def unsupported(*xs: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (None when they can)."""
    if triton is None:
        return f"Triton is not installed ({_INSTALL})"
    if not interpreting() and not all(x.is_cuda for x in xs):
        return "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if any(x.dtype not in _DTYPES for x in xs):
        return f"the Triton kernels take float16, bfloat16 or float32, got {sorted({str(x.dtype) for x in xs})}"
    if any(x.shape[-1] > MAX_HEAD_DIM for x in xs):
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got {[x.shape[-1] for x in xs]}"
    if xs and math.prod(xs[0].shape[:-2]) > _MAX_GRID_Y:  # batch·heads is the grid's second dimension
        return f"the Triton kernels take at most {_MAX_GRID_Y} (batch, head) pairs, got {math.prod(xs[0].shape[:-2])}"
    if any(x.numel() == 0 for x in xs):
        return "the Triton kernels take no empty tensors"
    return None


if triton is not None:

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the interpreter multiplies bfloat16 blocks as their integer bit patterns; the exact fp32
        # product of the same bf16 values is what a tensor core computes.
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=PREC)
        return out

    @triton.jit
    def _load(ptr, rows, n_rows, stride, cols, n_cols):
        """A [rows, cols] tile of a row-major matrix with unit column stride; zero outside n_rows × n_cols."""
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _store(ptr, value, rows, n_rows, stride, cols, n_cols):
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        tl.store(ptr + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _head(ptr, z, h, stride_z, stride_h):
        return ptr + z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h

    @triton.jit
    def _real_keys(MASK, z, smz, smn, keys, N_K, HAS_MASK: tl.constexpr):
        """[BLOCK_N] bool: the keys inside Nk and, with a key padding mask, not padding."""
        valid = keys < N_K
        if HAS_MASK:
            valid = valid & (tl.load(MASK + z.to(tl.int64) * smz + keys * smn, mask=valid, other=0) != 0)
        return valid

    @triton.jit
    def _safe_lse2(lse2, HAS_MASK: tl.constexpr):
        """A row whose keys are all padding has lse -inf: 0 instead (exp2(S − lse) would be +inf before the mask
        zeroes it; the kernels never let it through, but no inf need be made)."""
        if HAS_MASK:
            lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
        return lse2

    @triton.jit
    def _fwd_kernel(
        Q, K, V, TQ, TK, TV, O, TO, LSE,
        sqz, sqh, sqm, skz, skh, skn, svz, svh, svn,
        stqz, stqh, stqm, stkz, stkh, stkn, stvz, stvh, stvn,
        soz, soh, som, stoz, stoh, stom,
        H, N_Q, N_K, D, DV, scale, MASK, smz, smn,
        HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, HAS_TS: tl.constexpr,
        HAS_MASK: tl.constexpr, TANGENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        z, h = bh // H, bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_d, cols_dv, offs_n = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N)
        k_ptr, v_ptr = _head(K, z, h, skz, skh), _head(V, z, h, svz, svh)
        tk_ptr, tv_ptr = _head(TK, z, h, stkz, stkh), _head(TV, z, h, stvz, stvh)
        q = _load(_head(Q, z, h, sqz, sqh), rows, N_Q, sqm, cols_d, D)
        if HAS_TQ:
            tq = _load(_head(TQ, z, h, stqz, stqh), rows, N_Q, stqm, cols_d, D)
        qk_scale = scale * 1.4426950408889634  # logits in base 2: exp(x) = exp2(x·log2 e)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)     # Σ P̃ V
        t_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)   # Σ P̃ tV + (P̃ ⊙ tS) V
        r_i = tl.zeros([BLOCK_M], tl.float32)               # Σ P̃ ⊙ tS
        for start_n in range(0, N_K, BLOCK_N):
            keys = start_n + offs_n
            k = _load(k_ptr, keys, N_K, skn, cols_d, D)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            s = tl.where(_real_keys(MASK, z, smz, smn, keys, N_K, HAS_MASK)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
            if HAS_MASK:  # no real key yet: exp2(-inf - 0) = 0, where exp2(-inf + inf) would be NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_ref)
            p = tl.math.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load(v_ptr, keys, N_K, svn, cols_dv, DV)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
            if TANGENT:
                t_acc = t_acc * alpha[:, None]
                if HAS_TS:
                    ts = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                    if HAS_TQ:
                        ts += _dot(tq, tl.trans(k), PREC, UPCAST)
                    if HAS_TK:
                        tk = _load(tk_ptr, keys, N_K, stkn, cols_d, D)
                        ts += _dot(q, tl.trans(tk), PREC, UPCAST)
                    pts = p * (ts * scale)
                    r_i = r_i * alpha + tl.sum(pts, 1)
                    t_acc += _dot(pts.to(v.dtype), v, PREC, UPCAST)
                if HAS_TV:
                    tv = _load(tv_ptr, keys, N_K, stvn, cols_dv, DV)
                    t_acc += _dot(p.to(tv.dtype), tv, PREC, UPCAST)
            m_i = m_new

        if HAS_MASK:  # a row with every key padding: l = 0 and all accumulators 0, so O = tO = 0, lse = -inf
            inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
            lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        else:
            inv_l = 1.0 / l_i
            lse = m_i + tl.math.log2(l_i)
        o = acc * inv_l[:, None]
        _store(_head(O, z, h, soz, soh), o, rows, N_Q, som, cols_dv, DV)
        tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse * 0.6931471805599453, mask=rows < N_Q)
        if TANGENT:
            t_o = t_acc * inv_l[:, None] - (r_i * inv_l)[:, None] * o
            _store(_head(TO, z, h, stoz, stoh), t_o, rows, N_Q, stom, cols_dv, DV)

    @triton.jit
    def _tangent_kernel(
        Q, K, V, TQ, TK, TV, O, LSE, TO,
        sqz, sqh, sqm, skz, skh, skn, svz, svh, svn,
        stqz, stqh, stqm, stkz, stkh, stkn, stvz, stvh, stvn,
        soz, soh, som, stoz, stoh, stom,
        H, N_Q, N_K, D, DV, scale, MASK, smz, smn,
        HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, HAS_TS: tl.constexpr,
        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        z, h = bh // H, bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_d, cols_dv, offs_n = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N)
        k_ptr, v_ptr = _head(K, z, h, skz, skh), _head(V, z, h, svz, svh)
        tk_ptr, tv_ptr = _head(TK, z, h, stkz, stkh), _head(TV, z, h, stvz, stvh)
        q = _load(_head(Q, z, h, sqz, sqh), rows, N_Q, sqm, cols_d, D)
        if HAS_TQ:
            tq = _load(_head(TQ, z, h, stqz, stqh), rows, N_Q, stqm, cols_d, D)
        qk_scale = scale * 1.4426950408889634
        lse2 = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0) * 1.4426950408889634
        lse2 = _safe_lse2(lse2, HAS_MASK)

        t_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)   # Σ P tV + (P ⊙ tS) V
        r_i = tl.zeros([BLOCK_M], tl.float32)               # Σ P ⊙ tS
        for start_n in range(0, N_K, BLOCK_N):
            keys = start_n + offs_n
            k = _load(k_ptr, keys, N_K, skn, cols_d, D)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(_real_keys(MASK, z, smz, smn, keys, N_K, HAS_MASK)[None, :], p, 0.0)
            v = _load(v_ptr, keys, N_K, svn, cols_dv, DV)
            if HAS_TS:
                ts = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                if HAS_TQ:
                    ts += _dot(tq, tl.trans(k), PREC, UPCAST)
                if HAS_TK:
                    tk = _load(tk_ptr, keys, N_K, stkn, cols_d, D)
                    ts += _dot(q, tl.trans(tk), PREC, UPCAST)
                pts = p * (ts * scale)
                r_i += tl.sum(pts, 1)
                t_acc += _dot(pts.to(v.dtype), v, PREC, UPCAST)
            if HAS_TV:
                tv = _load(tv_ptr, keys, N_K, stvn, cols_dv, DV)
                t_acc += _dot(p.to(tv.dtype), tv, PREC, UPCAST)

        o = _load(_head(O, z, h, soz, soh), rows, N_Q, som, cols_dv, DV).to(tl.float32)
        _store(_head(TO, z, h, stoz, stoh), t_acc - r_i[:, None] * o, rows, N_Q, stom, cols_dv, DV)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV_,
        sqz, sqh, sqm, skz, skh, skn, svz, svh, svn, sdoz, sdoh, sdom,
        sdkz, sdkh, sdkn, sdvz, sdvh, sdvn,
        H, N_Q, N_K, D, DV, scale, MASK, smz, smn, HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_n, bh = tl.program_id(0), tl.program_id(1)
        z, h = bh // H, bh % H
        keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_d, cols_dv, offs_m = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_M)
        q_ptr, do_ptr = _head(Q, z, h, sqz, sqh), _head(DO, z, h, sdoz, sdoh)
        k = _load(_head(K, z, h, skz, skh), keys, N_K, skn, cols_d, D)
        v = _load(_head(V, z, h, svz, svh), keys, N_K, svn, cols_dv, DV)
        qk_scale = scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        real = _real_keys(MASK, z, smz, smn, keys, N_K, HAS_MASK)
        for start_m in range(0, N_Q, BLOCK_M):
            rows = start_m + offs_m
            q = _load(q_ptr, rows, N_Q, sqm, cols_d, D)
            do = _load(do_ptr, rows, N_Q, sdom, cols_dv, DV)
            lse2 = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0) * 1.4426950408889634
            lse2 = _safe_lse2(lse2, HAS_MASK)
            delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where((rows < N_Q)[:, None] & real[None, :], p, 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)
        _store(_head(DK, z, h, sdkz, sdkh), dk * scale, keys, N_K, sdkn, cols_d, D)
        _store(_head(DV_, z, h, sdvz, sdvh), dv, keys, N_K, sdvn, cols_dv, DV)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ,
        sqz, sqh, sqm, skz, skh, skn, svz, svh, svn, sdoz, sdoh, sdom, sdqz, sdqh, sdqm,
        H, N_Q, N_K, D, DV, scale, MASK, smz, smn, HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        z, h = bh // H, bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_d, cols_dv, offs_n = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N)
        k_ptr, v_ptr = _head(K, z, h, skz, skh), _head(V, z, h, svz, svh)
        q = _load(_head(Q, z, h, sqz, sqh), rows, N_Q, sqm, cols_d, D)
        do = _load(_head(DO, z, h, sdoz, sdoh), rows, N_Q, sdom, cols_dv, DV)
        lse2 = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0) * 1.4426950408889634
        lse2 = _safe_lse2(lse2, HAS_MASK)
        delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + rows, mask=rows < N_Q, other=0.0)
        qk_scale = scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N_K, BLOCK_N):
            keys = start_n + offs_n
            k = _load(k_ptr, keys, N_K, skn, cols_d, D)
            v = _load(v_ptr, keys, N_K, svn, cols_dv, DV)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(_real_keys(MASK, z, smz, smn, keys, N_K, HAS_MASK)[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
        _store(_head(DQ, z, h, sdqz, sdqh), dq * scale, rows, N_Q, sdqm, cols_d, D)


# -- launching ------------------------------------------------------------------------------------------------
def _pow2(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels address rows by stride and columns by index: the last dim must be contiguous."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _flags(dtype: torch.dtype) -> dict:
    """Dot precision: "ieee" for fp32 unless torch allows tf32 matmuls (as torch.bmm would); the interpreter
    always multiplies exactly. UPCAST works around the interpreter's bfloat16 products (see `_dot`)."""
    tf32 = dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32
    prec = "ieee" if dtype == torch.float32 and not tf32 else "tf32"  # "tf32" is tl.dot's default (fp16/bf16: moot)
    return {"PREC": prec, "UPCAST": interpreting() and dtype == torch.bfloat16}


# (BLOCK_M, BLOCK_N, num_warps, num_stages), first choice first; a launch that runs out of shared memory falls
# back to the next one, and the choice is remembered per kernel, head dim and dtype. The first choices compile
# for sm_90 without register spills (bf16; the fused kernel at d = 128 spills 24 bytes), measured with ptxas.
# A card's measured configuration (scm.nets.attention_tuning: the packaged table, or SCM_ATTENTION_TUNING's) goes
# before them.
_CANDIDATES = {
    "small": [(64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],   # padded d ≤ 64
    "large": [(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],   # padded d = 128
}
_CHOSEN: dict[tuple, tuple] = {}


def _out_of_resources(err: Exception) -> bool:
    return type(err).__name__ == "OutOfResources" or "out of resource" in str(err).lower()


def _candidates(name: str, dtype: torch.dtype, consts: dict, device: torch.device, blocks) -> tuple[list, bool]:
    """(the configurations to try in order, whether the first is forced: no fallback, nothing remembered)."""
    bd, bdv = consts["BLOCK_D"], consts["BLOCK_DV"]
    forced = tuning.forced(name) or (None if blocks is None else (*blocks, 4, 1))
    if forced is not None:
        return [forced], True
    defaults = _defaults(bd, bdv)
    measured = tuning.tuned(name, dtype, bd, bdv, device)
    return ([measured] if measured else []) + [c for c in defaults if c != measured], False


def _defaults(block_d: int, block_dv: int) -> list:
    return _CANDIDATES["small" if max(block_d, block_dv) <= 64 else "large"]


def first_choice(name: str, dtype: torch.dtype, block_d: int, block_dv: int, device: torch.device) -> tuple:
    """(the configuration a launch of kernel `name` tries first on `device`, "table" or "default"): the card's table
    entry (`scm.nets.attention_tuning`), else the first of the default list (a card short of shared memory then
    falls back down that list)."""
    measured = tuning.tuned(name, dtype, block_d, block_dv, device)
    if measured is not None:
        return measured, "table"
    return _defaults(block_d, block_dv)[0], "default"


def _launch(kernel, name: str, length: int, by_keys: bool, bh: int, blocks, masked: bool, args: tuple,
            consts: dict, device: torch.device) -> None:
    """Run `kernel` (`name`: one of attention_tuning.KERNELS) on a grid (⌈length / block⌉, bh), the block being
    BLOCK_N when its programs tile the keys (by_keys) and BLOCK_M otherwise, with the first candidate configuration
    that fits the card (`_candidates`)."""
    candidates, forced = _candidates(name, args[0].dtype, consts, device, blocks)
    key = (name, args[0].dtype, masked, consts["BLOCK_D"], consts["BLOCK_DV"], candidates[0])
    start = 0 if forced else candidates.index(_CHOSEN.get(key, candidates[0]))
    for i in range(start, len(candidates)):
        bm, bn, warps, stages = candidates[i]
        grid = (triton.cdiv(length, bn if by_keys else bm), bh)
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        except Exception as err:
            if not forced and i + 1 < len(candidates) and _out_of_resources(err):
                continue
            raise
        if not forced:
            _CHOSEN[key] = candidates[i]
        return


def _check(q, k, v, tq=None, tk=None, tv=None, key_mask=None) -> None:
    tangents = (tq, tk, tv)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected [B, heads, N, d] tensors; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for t, x in zip(tangents, (q, k, v), strict=True):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"a tangent of shape {tuple(t.shape)} for a primal of shape {tuple(x.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (k.shape[0], k.shape[2])
                                 or key_mask.device != k.device):
        raise ValueError(f"key_mask must be bool [{k.shape[0]}, {k.shape[2]}] on {k.device}, got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)} on {key_mask.device}")
    reason = unsupported(q, k, v, *(t for t in tangents if t is not None))
    if reason is not None:
        raise RuntimeError(reason)
    if len({x.dtype for x in (q, k, v, *tangents) if x is not None}) != 1:
        raise ValueError("the Triton kernels take q, k, v and tangents of one dtype")


def _dims(q, v) -> dict:
    return {"BLOCK_D": _pow2(q.shape[3]), "BLOCK_DV": _pow2(v.shape[3]), **_flags(q.dtype)}


def _mask_args(key_mask: torch.Tensor | None, q: torch.Tensor) -> tuple:
    """(MASK, its batch stride, its key stride) for the kernels: the bool mask's bytes, or q (never read)."""
    if key_mask is None:
        return q, 0, 0
    m = key_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def attention_forward(q, k, v, tq=None, tk=None, tv=None, *, scale: float, blocks: tuple[int, int] | None = None,
                      key_mask: torch.Tensor | None = None):
    """(O, tO or None, lse) in one pass: tO when any tangent is given; lse float32 [B, heads, N].

    `blocks`: (BLOCK_M, BLOCK_N) to force (tests); None picks them per head dim. `key_mask`: optional bool
    [B, Nk], True on real keys (every head alike); a row whose keys are all padding gives O = tO = 0, lse = -inf.
    """
    _check(q, k, v, tq, tk, tv, key_mask)
    q, k, v, tq, tk, tv = map(_unit_stride, (q, k, v, tq, tk, tv))
    b, h, n, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    tangent = any(t is not None for t in (tq, tk, tv))
    o = q.new_empty(b, h, n, dv)
    t_o = torch.empty_like(o) if tangent else o
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    tq_, tk_, tv_ = (x if t is None else t for t, x in ((tq, q), (tk, k), (tv, v)))  # absent: never read
    consts = {"HAS_TQ": tq is not None, "HAS_TK": tk is not None, "HAS_TV": tv is not None,
              "HAS_TS": tq is not None or tk is not None, "HAS_MASK": key_mask is not None, "TANGENT": tangent,
              **_dims(q, v)}
    args = (q, k, v, tq_, tk_, tv_, o, t_o, lse, *_strides(q), *_strides(k), *_strides(v),
            *_strides(tq_), *_strides(tk_), *_strides(tv_), *_strides(o), *_strides(t_o), h, n, nk, d, dv, scale,
            *_mask_args(key_mask, q))
    _launch(_fwd_kernel, "fwd_tangent" if tangent else "fwd", n, False, b * h, blocks, key_mask is not None, args,
            consts, q.device)
    return o, (t_o if tangent else None), lse


def attention_tangent(q, k, v, o, lse, tq=None, tk=None, tv=None, *, scale: float,
                      blocks: tuple[int, int] | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """tO from a saved output O and log-sum-exp (one pass over the keys, P = exp(S − lse) already normalised)."""
    _check(q, k, v, tq, tk, tv, key_mask)
    q, k, v, o, tq, tk, tv = map(_unit_stride, (q, k, v, o, tq, tk, tv))
    b, h, n, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    if all(t is None for t in (tq, tk, tv)):
        return torch.zeros_like(o)
    t_o, lse = torch.empty_like(o), lse.float().contiguous()
    tq_, tk_, tv_ = (x if t is None else t for t, x in ((tq, q), (tk, k), (tv, v)))
    consts = {"HAS_TQ": tq is not None, "HAS_TK": tk is not None, "HAS_TV": tv is not None,
              "HAS_TS": tq is not None or tk is not None, "HAS_MASK": key_mask is not None, **_dims(q, v)}
    args = (q, k, v, tq_, tk_, tv_, o, lse, t_o, *_strides(q), *_strides(k), *_strides(v),
            *_strides(tq_), *_strides(tk_), *_strides(tv_), *_strides(o), *_strides(t_o), h, n, nk, d, dv, scale,
            *_mask_args(key_mask, q))
    _launch(_tangent_kernel, "tangent", n, False, b * h, blocks, key_mask is not None, args, consts, q.device)
    return t_o


def attention_backward(q, k, v, o, lse, d_o, *, scale: float, blocks: tuple[int, int] | None = None,
                       key_mask: torch.Tensor | None = None):
    """(dQ, dK, dV) of O = softmax(scale·QKᵀ)V for the output gradient d_o, from the saved O and lse (padding
    keys and rows whose keys are all padding contribute nothing)."""
    _check(q, k, v, key_mask=key_mask)
    q, k, v, o, d_o = map(_unit_stride, (q, k, v, o, d_o.to(o.dtype)))
    b, h, n, d = q.shape
    nk, dv_ = k.shape[2], v.shape[3]
    lse = lse.float().contiguous()
    delta = (d_o.float() * o.float()).sum(-1).contiguous()   # rowsum(dO ⊙ O), float32 [B, heads, N]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    consts = {"HAS_MASK": key_mask is not None, **_dims(q, v)}
    common = (h, n, nk, d, dv_, scale, *_mask_args(key_mask, q))
    args = (q, k, v, d_o, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(d_o),
            *_strides(dk), *_strides(dv), *common)
    _launch(_bwd_dkdv_kernel, "dkdv", nk, True, b * h, blocks, key_mask is not None, args, consts, q.device)
    args = (q, k, v, d_o, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(d_o),
            *_strides(dq), *common)
    _launch(_bwd_dq_kernel, "dq", n, False, b * h, blocks, key_mask is not None, args, consts, q.device)
    return dq, dk, dv



# -- the kernels as torch operators ------------------------------------------------------------------------
# A custom autograd Function's rules see functorch-wrapped tensors under torch.func transforms, and a kernel
# needs real storage; operators are unwrapped by the dispatcher. None of them is differentiable itself: the
# autograd Function in scm.nets.attention supplies the backward and JVP rules. Schemas are spelled out, so
# that no torch version has to infer them from the (postponed) annotations.
def _b(blocks: Sequence[int] | None) -> tuple[int, int] | None:
    return None if blocks is None else (int(blocks[0]), int(blocks[1]))


@torch.library.custom_op("scm::attention_triton_forward", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, float scale, int[]? blocks=None, "
                                "Tensor? key_mask=None) -> (Tensor, Tensor)")
def forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               blocks: Sequence[int] | None = None,
               key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, lse)."""
    o, _, lse = attention_forward(q, k, v, scale=scale, blocks=_b(blocks), key_mask=key_mask)
    return o, lse


@torch.library.custom_op("scm::attention_triton_jvp", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, float scale, "
                                "int[]? blocks=None, Tensor? key_mask=None) -> (Tensor, Tensor, Tensor)")
def jvp_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None, tk: torch.Tensor | None,
           tv: torch.Tensor | None, scale: float, blocks: Sequence[int] | None = None,
           key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, tO, lse) from the fused kernel; tO is zero without tangents."""
    o, t_o, lse = attention_forward(q, k, v, tq, tk, tv, scale=scale, blocks=_b(blocks), key_mask=key_mask)
    return o, torch.zeros_like(o) if t_o is None else t_o, lse


@torch.library.custom_op("scm::attention_triton_tangent", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? tq, Tensor? tk, "
                                "Tensor? tv, float scale, int[]? blocks=None, Tensor? key_mask=None) -> Tensor")
def tangent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
               tq: torch.Tensor | None, tk: torch.Tensor | None, tv: torch.Tensor | None, scale: float,
               blocks: Sequence[int] | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """tO from the saved O and lse."""
    return attention_tangent(q, k, v, o, lse, tq, tk, tv, scale=scale, blocks=_b(blocks), key_mask=key_mask)


@torch.library.custom_op("scm::attention_triton_backward", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor d_o, float scale, "
                                "int[]? blocks=None, Tensor? key_mask=None) -> (Tensor, Tensor, Tensor)")
def backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                d_o: torch.Tensor, scale: float, blocks: Sequence[int] | None = None,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV)."""
    return attention_backward(q, k, v, o, lse, d_o, scale=scale, blocks=_b(blocks), key_mask=key_mask)


# Fake (meta) implementations: the shapes and dtypes of each operator's outputs without running a kernel, so that
# torch.compile (dynamo, AOTAutograd) traces through the operators instead of breaking the graph around them.
@forward_op.register_fake
def _(q, k, v, scale, blocks=None, key_mask=None):
    b, h, n, _ = q.shape
    return q.new_empty(b, h, n, v.shape[3]), q.new_empty(b, h, n, dtype=torch.float32)


@jvp_op.register_fake
def _(q, k, v, tq, tk, tv, scale, blocks=None, key_mask=None):
    b, h, n, _ = q.shape
    return q.new_empty(b, h, n, v.shape[3]), q.new_empty(b, h, n, v.shape[3]), q.new_empty(b, h, n,
                                                                                              dtype=torch.float32)


@tangent_op.register_fake
def _(q, k, v, o, lse, tq, tk, tv, scale, blocks=None, key_mask=None):
    return torch.empty_like(_unit_stride(o))


@backward_op.register_fake
def _(q, k, v, o, lse, d_o, scale, blocks=None, key_mask=None):
    return tuple(torch.empty_like(_unit_stride(x)) for x in (q, k, v))
