"""Attention's JVP: the math `attention_jvp` against torch.func.jvp of naive attention in float64, and the
Triton kernels (fused forward + tangent, LSE-based tangent, FlashAttention-2 backward) against the math path.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any
kernel is defined): slow, so shapes are tiny and the blocks 16 × 16, which still gives several query and
key blocks with ragged edges. Without Triton the kernel tests skip.

Tolerances. float32 kernel vs float32 math: both accumulate in float32 in a different order (and the kernel
uses exp2 of log2-scaled logits): errors of a few ulp × √Nk ≈ 1e-6 on O(1) values; compared with atol 2e-5,
rtol 1e-5. Half-precision inputs vs the float32 math path on the same (rounded) inputs: the kernel rounds the
probabilities (and P ⊙ tS, dS) to the input dtype before their products, as FlashAttention does, and its
outputs; each costs ≈ one unit roundoff u (bf16 2⁻⁸ ≈ 3.9e-3, fp16 2⁻¹¹ ≈ 4.9e-4) of relative error,
averaging over the keys; measured relative errors (‖err‖ / ‖ref‖) are 0.5u–1.6u, checked below 4u.
"""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import scm.nets.attention as attn_mod
from scm.nets.attention import attention, attention_jvp

from conftest import kernel_device

D = torch.float64
BLOCKS = (16, 16)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _inputs(b, h, n, nk, d, dv, dtype=torch.float32, seed=0):
    shapes = [(b, h, n, d), (b, h, nk, d), (b, h, nk, dv)]
    primals = [_rand(*s, seed=seed + i, dtype=dtype) for i, s in enumerate(shapes)]
    tangents = [_rand(*s, seed=seed + 3 + i, dtype=dtype) for i, s in enumerate(shapes)]
    return primals, tangents


def _naive(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _rel(a, ref):
    return float((a.double() - ref.double()).norm() / ref.double().norm())




# -- the math path ---------------------------------------------------------------------------------------------
def test_math_attention_jvp_equals_func_jvp_of_naive_attention(monkeypatch):
    (q, k, v), (tq, tk, tv) = _inputs(2, 3, 10, 7, 8, 5, dtype=D)
    monkeypatch.setattr(attn_mod, "_BLOCK_ELEMENTS", 6 * 7 * 3)  # 4 query blocks of 3 rows (the last of 1)
    ref_o, ref_t = torch.func.jvp(_naive, (q, k, v), (tq, tk, tv))
    o, t, lse = attention_jvp(q, k, v, tq, tk, tv, backend="math", return_lse=True)
    torch.testing.assert_close(o, ref_o, atol=1e-14, rtol=1e-12)  # float64 round-off only
    torch.testing.assert_close(t, ref_t, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), -1), atol=1e-14, rtol=0)
    # absent tangents contribute nothing: each term alone, and none at all
    for keep in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        ts = [t if on else torch.zeros_like(t) for t, on in zip((tq, tk, tv), keep, strict=True)]
        part = attention_jvp(q, k, v, *(t if on else None for t, on in zip((tq, tk, tv), keep, strict=True)))[1]
        torch.testing.assert_close(part, torch.func.jvp(_naive, (q, k, v), tuple(ts))[1], atol=1e-13, rtol=1e-12)
    assert torch.equal(attention_jvp(q, k, v, None, None, None)[1], torch.zeros_like(o))
    # "auto" on CPU tensors is the math path
    assert torch.equal(attention_jvp(q, k, v, tq, tk, tv)[1], t)


def test_backend_errors_name_the_extra(monkeypatch):
    (q, k, v), (tq, tk, tv) = _inputs(1, 1, 4, 5, 8, 8, dtype=D)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_jvp(q, k, v, tq, tk, tv, backend="flash")
    with pytest.raises(ValueError, match="shape"):
        attention_jvp(q, k, v, tk, tk, tv)
    with pytest.raises(RuntimeError, match=r"pip install scm\[triton\]"):
        attention_jvp(q, k, v, tq, tk, tv, backend="triton")  # float64: or Triton missing, or no CUDA


def test_triton_request_without_triton_or_cuda_names_the_extra(kernels, monkeypatch):
    (q, k, v), (tq, tk, tv) = _inputs(1, 1, 4, 4, 16, 16)
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(RuntimeError, match=r"needs Triton: pip install scm\[triton\]"):
        attention_jvp(q, k, v, tq, tk, tv, backend="triton")
    monkeypatch.undo()
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match=r"need CUDA tensors.*pip install scm\[triton\]"):
            attention_jvp(q, k, v, tq, tk, tv, backend="triton")


def test_attention_layer_on_cpu_never_runs_the_kernels(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton route ran on CPU tensors")

    monkeypatch.setattr(attn_mod._TritonAttention, "apply", fail)
    q, k, v = _rand(2, 5, 8), _rand(2, 6, 8, seed=1), _rand(2, 6, 4, seed=2)
    exact = attn_mod._Attention.apply(q, k, v, 8**-0.5, None)[0]
    assert torch.equal(attention(q.clone().requires_grad_(), k, v).detach(), exact)  # differentiable: the exact op


def test_inference_attention_uses_pytorchs_fused_kernel_and_derivatives_the_exact_op(monkeypatch):
    """No tangent and no backward: F.scaled_dot_product_attention (equal to the exact op to float32 rounding);
    under backward AD, forward AD or torch.func.jvp: the exact op, whose JVP rule the tangent needs. The fused route
    is taken on GPUs; here it is taken on the CPU by declaring the CPU such a device (the kernel is PyTorch's own)."""
    q, k, v = _rand(2, 5, 8), _rand(2, 6, 8, seed=1), _rand(2, 6, 4, seed=2)
    with torch.no_grad():  # on the CPU: the exact op, batch-invariant
        assert torch.equal(attention(q, k, v), attn_mod._Attention.apply(q, k, v, 8**-0.5, None)[0])
    monkeypatch.setattr(attn_mod, "_fused_for_inference", lambda q: q.dtype != torch.float64)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1)
                        or sdpa(*a, **k))
    exact = attn_mod._Attention.apply(q, k, v, 8**-0.5, None)[0]
    with torch.no_grad():
        fused = attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-6)  # another summation order, fp32 rounding
    attention(q.clone().requires_grad_(), k, v).sum().backward()
    with torch.autograd.forward_ad.dual_level():
        attention(torch.autograd.forward_ad.make_dual(q, torch.ones_like(q)), k, v)
    torch.func.jvp(lambda x: attention(x, k, v), (q,), (torch.ones_like(q),))
    with torch.no_grad():
        attention(q.double(), k.double(), v.double())  # float64 stays exact
    assert calls == [1]


# -- the fused kernel against the math path, float32 ---------------------------------------------------------------
CASES = {  # (B, heads, N, Nk, d, dv): ragged block edges everywhere, one head-dim class each
    "d32-cross": (1, 2, 37, 23, 32, 32),
    "d64-self": (2, 1, 20, 20, 64, 64),
    "d72-padded": (1, 1, 19, 33, 72, 72),
    "d128": (1, 1, 17, 18, 128, 128),
    "dv-other": (1, 2, 21, 18, 32, 24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_kernel_matches_math_float32(kernels, case):
    (q, k, v), (tq, tk, tv) = _inputs(*CASES[case])
    dev = kernel_device()
    args = [x.to(dev) for x in (q, k, v, tq, tk, tv)]
    o, t, lse = kernels.attention_forward(*args, scale=q.shape[-1] ** -0.5, blocks=BLOCKS)
    ref_o, ref_t, ref_lse = attention_jvp(q, k, v, tq, tk, tv, backend="math", return_lse=True)
    torch.testing.assert_close(o.cpu(), ref_o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(t.cpu(), ref_t, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=1e-5)
    # the public entry point with the default blocks
    o2, t2 = attention_jvp(*args, backend="triton")
    torch.testing.assert_close(o2.cpu(), ref_o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(t2.cpu(), ref_t, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 0, 0)])
def test_fused_kernel_with_absent_tangents(kernels, keep):
    (q, k, v), tangents = _inputs(1, 2, 18, 21, 32, 32, seed=7)
    ts = [t if on else None for t, on in zip(tangents, keep, strict=True)]
    dev = kernel_device()
    o, t = attention_jvp(*(x.to(dev) for x in (q, k, v)), *(None if x is None else x.to(dev) for x in ts),
                         backend="triton")
    ref_o, ref_t = attention_jvp(q, k, v, *ts, backend="math")
    torch.testing.assert_close(o.cpu(), ref_o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(t.cpu(), ref_t, atol=2e-5, rtol=1e-5)
    if not any(keep):
        assert not t.any()


# -- the layer's autograd Function on the kernels: forward, JVP (LSE-based tangent kernel), backward -----------------
@pytest.mark.parametrize("shape", [(3, 37, 23, 32, 32), (2, 19, 33, 72, 40)])
def test_kernel_autograd_function_matches_math(kernels, shape):
    n, lq, lk, c, cv = shape
    dev = kernel_device()
    q, k, v = _rand(n, lq, c).to(dev), _rand(n, lk, c, seed=1).to(dev), _rand(n, lk, cv, seed=2).to(dev)
    tq, tk, tv = (_rand(*x.shape, seed=3 + i).to(dev) for i, x in enumerate((q, k, v)))
    g = _rand(n, lq, cv, seed=6).to(dev)
    s = c**-0.5

    def kernel(a, b, w):
        a, b, w = (x.unsqueeze(1) for x in (a, b, w))
        return attn_mod._TritonAttention.apply(a, b, w, s, BLOCKS, None)[0].squeeze(1)

    def math_path(a, b, w):
        return attn_mod._Attention.apply(a, b, w, s, None)[0]

    results = []
    for fn in (kernel, math_path):
        out, t_func = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
        _, t_part = torch.func.jvp(lambda a, w, fn=fn: fn(a, k, w), (q, v), (tq, tv))  # no key tangent
        # the fused training pass: forward-AD tangents while the primal is recorded for backward
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with fwAD.dual_level():
            dual = fn(*(fwAD.make_dual(x, t) for x, t in zip(leaves, (tq, tk, tv), strict=True)))
            primal, t_fwad = fwAD.unpack_dual(dual)
            grads = torch.autograd.grad(primal, leaves, g)
        results.append((out, t_func, t_part, t_fwad, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# -- half precision against the float32 math path on the same inputs ------------------------------------------
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 4 * 2.0**-11), (torch.bfloat16, 4 * 2.0**-8)])
def test_half_precision_inputs_against_float32(kernels, dtype, bound):
    (q, k, v), (tq, tk, tv) = _inputs(1, 2, 37, 29, 64, 64, seed=11)
    dev = kernel_device()
    half = [x.to(dev, dtype) for x in (q, k, v, tq, tk, tv)]
    exact = [x.float().cpu() for x in half]  # the same rounded values, float32
    o, t, lse = kernels.attention_forward(*half, scale=0.125, blocks=BLOCKS)
    ref_o, ref_t, ref_lse = attention_jvp(*exact, backend="math", return_lse=True)
    assert o.dtype == t.dtype == dtype and lse.dtype == torch.float32
    assert _rel(o.cpu(), ref_o) < bound and _rel(t.cpu(), ref_t) < bound
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-4, rtol=1e-5)  # float32 statistics throughout
    t_lse = kernels.attention_tangent(*half[:3], o, lse, *half[3:], scale=0.125, blocks=BLOCKS)
    assert _rel(t_lse.cpu(), ref_t) < bound
    d_o = _rand(*o.shape, seed=20).to(dev, dtype)
    grads = kernels.attention_backward(*half[:3], o, lse, d_o, scale=0.125, blocks=BLOCKS)
    leaves = [x.clone().requires_grad_() for x in exact[:3]]
    ref_grads = torch.autograd.grad(_naive(*leaves), leaves, d_o.float().cpu())
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == dtype and _rel(a.cpu(), b) < bound


def test_fp32_products_are_exact_in_the_interpreter_and_follow_torch_tf32_flag_on_gpus(kernels, monkeypatch):
    assert kernels._flags(torch.float32)["PREC"] == ("ieee" if kernels.interpreting()
                                                     or not torch.backends.cuda.matmul.allow_tf32 else "tf32")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kernels._flags(torch.float32)["PREC"] == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert kernels._flags(torch.float32)["PREC"] == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert kernels._flags(torch.bfloat16) == {"PREC": "tf32", "UPCAST": False}  # precision moot for half inputs


def test_inputs_the_kernels_do_not_take_are_named(kernels):
    ok = torch.empty(2, 3, 5, 64)
    assert kernels.unsupported(ok, ok, ok) is None or not torch.cuda.is_available()
    assert "float16, bfloat16 or float32" in kernels.unsupported(ok.double())
    assert "head dims up to 128" in kernels.unsupported(torch.empty(2, 3, 5, 192))
    assert "(batch, head) pairs" in kernels.unsupported(torch.empty(65536, 1, 2, 16))  # the grid's y limit


def test_the_kernel_operators_fake_implementations_agree_with_the_kernels(kernels):
    """torch.library.opcheck: each operator's fake (meta) implementation gives the real outputs' shapes, dtypes and
    strides (test_faketensor), and AOTAutograd traces it (test_aot_dispatch_dynamic); with a padding mask, and with
    absent tangents."""
    dev = kernel_device()
    (q, k, v), (tq, tk, tv) = _inputs(2, 1, 20, 20, 16, 16)
    q, k, v, tq, tk, tv = (x.to(dev) for x in (q, k, v, tq, tk, tv))
    mask = torch.ones(2, 20, dtype=torch.bool, device=dev)
    mask[1, 5:] = False
    o, lse = kernels.forward_op(q, k, v, 0.25, BLOCKS, None)
    cases = [(kernels.forward_op, (q, k, v, 0.25, BLOCKS, None)), (kernels.forward_op, (q, k, v, 0.25, BLOCKS, mask)),
             (kernels.jvp_op, (q, k, v, tq, None, tv, 0.25, BLOCKS, mask)),
             (kernels.tangent_op, (q, k, v, o, lse, tq, tk, tv, 0.25, BLOCKS, None)),
             (kernels.backward_op, (q, k, v, o, lse, torch.randn_like(o), 0.25, BLOCKS, mask))]
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def test_torch_compile_traces_the_kernel_attention_in_one_graph(kernels):
    """The layer's kernel path (as on a GPU) compiles whole (fullgraph: no break at the operator) and equals eager.
    Under no grad: with gradients wanted, dynamo refuses any autograd Function that has a jvp rule (torch 2.13:
    "Unsupported custom jvp"), the math path's as well."""
    from scm.nets.attention import _TritonAttention

    dev = kernel_device()
    (q, k, v), _ = _inputs(2, 1, 20, 24, 16, 16, seed=3)
    q, k, v = (x.to(dev) for x in (q, k, v))
    mask = torch.ones(2, 24, dtype=torch.bool, device=dev)
    mask[0, 7:] = False

    def layer(q, k, v, mask):
        return _TritonAttention.apply(q, k, v, 0.25, BLOCKS, mask)[0] * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), layer(q, k, v, mask), atol=0, rtol=0)
