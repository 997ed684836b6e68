"""Key padding masks in attention: `attention(..., key_mask=)` and `attention_jvp(..., key_mask=)` on the math path and
the Triton kernels. Masked attention must equal attention over the real keys alone (gathered row by row), in the
output, its tangent (forward AD and torch.func.jvp) and its gradients; a row whose keys are all padding gives exactly
0 everywhere (no NaN); padding keys get gradient 0.

Masks (Lk = 37; the kernels run with 16 × 16 blocks, so keys fall in blocks 0–15, 16–31, 32–36): real keys 0–19
(the mask ends mid-block), none at all, holes with the whole first key block padding (the online softmax starts
from a block with no real key), and all keys real.

Tolerances. float64 math against float64 attention over the gathered keys: the same products, with zeros added
for the padding keys, so round-off only (atol 1e-13, rtol 1e-12, as tests/test_attention_triton.py). float64
central differences (tests/conftest.py: truncation ≈ 1e-12, rounding ≈ 1e-10): atol 1e-7, rtol 1e-6. float32
kernels against the float32 math path: a few ulp × √Lk, atol 2e-5, rtol 1e-5 (tests/test_attention_triton.py).
Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): shapes stay tiny.
"""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import scm.nets.attention as attn_mod
from scm.nets.attention import attention, attention_jvp

from conftest import central_difference, jvp_both, kernel_device

D = torch.float64
BLOCKS = (16, 16)
LK = 37


def _rand(*shape, seed=0, dtype=D):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _masks(n: int = 4) -> torch.Tensor:
    """[n, LK] bool, the patterns of the module docstring, repeated over n rows."""
    holes = torch.zeros(LK, dtype=torch.bool)
    holes[[17, 18, 22, 30, 31, 33, 36]] = True
    ends_mid_block = torch.arange(LK) < 20
    patterns = [ends_mid_block, torch.zeros(LK, dtype=torch.bool), holes, torch.ones(LK, dtype=torch.bool)]
    return torch.stack([patterns[i % 4] for i in range(n)])


def _naive(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _derivatives(fn, primals, tangents, g):
    """[out, tangent by torch.func.jvp, tangent by forward AD, dq, dk, dv] of fn(q, k, v) along `tangents`, with the
    gradient taken for the output cotangent g in the same forward-AD pass (as a training step does)."""
    out, t_func = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    leaves = [x.clone().requires_grad_() for x in primals]
    with fwAD.dual_level():
        dual = fn(*(fwAD.make_dual(x, t) for x, t in zip(leaves, tangents, strict=True)))
        primal, t_fwad = fwAD.unpack_dual(dual)
        grads = torch.autograd.grad(primal, leaves, g)
    return [out, t_func, t_fwad, *grads]


def _gathered(primals, tangents, g, mask):
    """_derivatives of naive attention over each row's real keys only, scattered back (zero on padding keys and
    for rows without any real key)."""
    q, k, v = primals
    results = [torch.zeros_like(x) for x in (g, g, g, q, k, v)]
    for i, real in enumerate(mask):
        if not real.any():
            continue
        sub = [q[i:i + 1], k[i:i + 1, real], v[i:i + 1, real]]
        sub_t = [tangents[0][i:i + 1], tangents[1][i:i + 1, real], tangents[2][i:i + 1, real]]
        out, t_func, t_fwad, dq, dk, dv = _derivatives(_naive, sub, sub_t, g[i:i + 1])
        for r, x in zip(results[:4], (out, t_func, t_fwad, dq), strict=True):
            r[i] = x[0]
        results[4][i, real], results[5][i, real] = dk[0], dv[0]
    return results


def _layer_inputs(n, lq, c, cv, dtype=D):
    shapes = [(n, lq, c), (n, LK, c), (n, LK, cv)]
    primals = [_rand(*shape, seed=i, dtype=dtype) for i, shape in enumerate(shapes)]
    tangents = [_rand(*x.shape, seed=3 + i, dtype=dtype) for i, x in enumerate(primals)]
    return primals, tangents, _rand(n, lq, cv, seed=6, dtype=dtype)


# -- the math path -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocked", [False, True])
def test_masked_attention_equals_attention_over_the_real_keys(blocked, monkeypatch):
    """Forward, JVP (both engines) and backward; cross-attention shapes (Lq ≠ Lk, Cv ≠ C). blocked: query blocks of
    3 rows (the last of 2) recomputing p in every pass; else one block whose probabilities the forward keeps."""
    if blocked:
        monkeypatch.setattr(attn_mod, "_BLOCK_ELEMENTS", 4 * LK * 3)
    primals, tangents, g = _layer_inputs(4, 11, 8, 5)
    mask = _masks()
    got = _derivatives(lambda q, k, v: attention(q, k, v, key_mask=mask), primals, tangents, g)
    ref = _gathered(primals, tangents, g, mask)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)
    for x in got:  # the row without real keys: exactly 0 (its gradient rows of dk, dv too), and no NaN anywhere
        assert not x.isnan().any() and not x[1].any()
    assert not got[4][~mask].any() and not got[5][~mask].any()  # padding keys get no gradient


def test_masked_attention_jvp_equals_central_differences(monkeypatch):
    monkeypatch.setattr(attn_mod, "_BLOCK_ELEMENTS", 4 * LK * 3)
    (q, k, v), tangents, _ = _layer_inputs(4, 7, 8, 6)
    mask = _masks()
    fn = lambda a, b, w: attention(a, b, w, key_mask=mask)  # noqa: E731
    jvp = jvp_both(fn, (q, k, v), tangents)
    torch.testing.assert_close(jvp, central_difference(fn, (q, k, v), tangents), atol=1e-7, rtol=1e-6)


def test_all_real_mask_and_no_mask_agree_and_bad_masks_are_refused():
    (q, k, v), _, _ = _layer_inputs(2, 5, 8, 8)
    full = torch.ones(2, LK, dtype=torch.bool)
    assert torch.equal(attention(q, k, v, key_mask=full), attention(q, k, v))  # masking nothing changes nothing
    for bad in (full.float(), full[:, :-1], full[:1]):
        with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
            attention(q, k, v, key_mask=bad)
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        attention_jvp(q[:, None], k[:, None], v[:, None], None, None, None, key_mask=full[:, None])


def test_attention_jvp_math_mask_is_shared_by_the_heads(monkeypatch):
    """[B, heads, N, d] with key_mask [B, Nk]: every head equals attention over its batch row's real keys; the
    log-sum-exp runs over the real keys, -inf for a row without any."""
    monkeypatch.setattr(attn_mod, "_BLOCK_ELEMENTS", 12 * LK * 2)
    b, h, n, d, dv = 4, 3, 5, 8, 6
    q, k, v = _rand(b, h, n, d), _rand(b, h, LK, d, seed=1), _rand(b, h, LK, dv, seed=2)
    tq, tk, tv = (_rand(*x.shape, seed=3 + i) for i, x in enumerate((q, k, v)))
    mask = _masks(b)
    o, t, lse = attention_jvp(q, k, v, tq, tk, tv, key_mask=mask, backend="math", return_lse=True)
    for i, real in enumerate(mask):
        if not real.any():
            assert not o[i].any() and not t[i].any() and (lse[i] == -math.inf).all()
            continue
        ref_o, ref_t = torch.func.jvp(_naive, (q[i], k[i][:, real], v[i][:, real]),
                                      (tq[i], tk[i][:, real], tv[i][:, real]))
        torch.testing.assert_close(o[i], ref_o, atol=1e-13, rtol=1e-12)
        torch.testing.assert_close(t[i], ref_t, atol=1e-13, rtol=1e-12)
        ref_lse = torch.logsumexp(q[i] @ k[i][:, real].transpose(-1, -2) / math.sqrt(d), -1)
        torch.testing.assert_close(lse[i], ref_lse, atol=1e-13, rtol=1e-12)


def test_inference_route_honours_the_mask_without_nan(monkeypatch):
    """PyTorch's fused kernel (taken on GPUs when nothing differentiates; here the CPU is declared such a device)
    with the mask: equal to the exact op to float32 rounding, and 0 (not NaN) on the row without real keys."""
    (q, k, v), _, _ = _layer_inputs(4, 9, 8, 5, dtype=torch.float32)
    mask = _masks()
    exact = attn_mod._Attention.apply(q, k, v, 8**-0.5, ~mask)[0]
    monkeypatch.setattr(attn_mod, "_fused_for_inference", lambda q: q.dtype != torch.float64)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    with torch.no_grad():
        fused = attention(q, k, v, key_mask=mask)
    assert calls == [1] and not fused.isnan().any() and not fused[1].any()
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-6)  # another summation order, fp32 rounding


# -- the Triton kernels against the math path, float32 ---------------------------------------------------------------


def _close(a, b):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=2e-5, rtol=1e-5)


def test_kernels_with_a_key_mask_match_math(kernels):
    """The fused forward + tangent, the tangent from the saved lse and both backward kernels; 4 batch rows × 2 heads
    sharing each row's mask, 19 queries (two query blocks, ragged), dv ≠ d; absent tangents too."""
    b, h, n, d, dv = 4, 2, 19, 16, 24
    dev, s = kernel_device(), d**-0.5
    q, k, v = _rand(b, h, n, d, dtype=torch.float32), _rand(b, h, LK, d, seed=1, dtype=torch.float32), \
        _rand(b, h, LK, dv, seed=2, dtype=torch.float32)
    tq, tk, tv = (_rand(*x.shape, seed=3 + i, dtype=torch.float32) for i, x in enumerate((q, k, v)))
    mask = _masks(b)
    on = [x.to(dev) for x in (q, k, v, tq, tk, tv, mask)]
    o, t, lse = kernels.attention_forward(*on[:6], scale=s, blocks=BLOCKS, key_mask=on[6])
    ref_o, ref_t, ref_lse = attention_jvp(q, k, v, tq, tk, tv, key_mask=mask, backend="math", return_lse=True)
    _close(o, ref_o), _close(t, ref_t), _close(lse, ref_lse)  # -inf on the row without real keys, as math's
    assert not o[1].any() and not t[1].any() and (lse[1] == -math.inf).all()
    _close(kernels.attention_tangent(*on[:3], o, lse, *on[3:6], scale=s, blocks=BLOCKS, key_mask=on[6]), ref_t)
    for keep in ((1, 0, 0), (0, 0, 1)):  # only a logit tangent / only a value tangent
        ts = [x if k_ else None for x, k_ in zip(on[3:6], keep, strict=True)]
        part = attention_jvp(*on[:3], *ts, key_mask=on[6], backend="triton")[1]
        _close(part, attention_jvp(q, k, v, *(x if k_ else None for x, k_ in zip((tq, tk, tv), keep, strict=True)),
                                   key_mask=mask, backend="math")[1])
    g = _rand(b, h, n, dv, seed=20, dtype=torch.float32)
    grads = kernels.attention_backward(*on[:3], o, lse, g.to(dev), scale=s, blocks=BLOCKS, key_mask=on[6])
    fold = lambda x: x.reshape(b * h, *x.shape[2:])  # noqa: E731
    leaves = [fold(x).clone().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, key_mask=mask.repeat_interleave(h, dim=0))
    for a, r in zip(grads, torch.autograd.grad(out, leaves, fold(g)), strict=True):
        _close(fold(a), r)
        assert not a.isnan().any()
    assert not grads[0][1].any()  # the row without real keys: no gradient; padding keys: none either
    assert not grads[1].transpose(1, 2)[~mask].any() and not grads[2].transpose(1, 2)[~mask].any()


def test_kernel_autograd_function_with_a_key_mask_matches_math(kernels):
    """The layer's Function on the kernels (forward saving lse, the lse tangent kernel, the FlashAttention-2
    backward) against the math Function, under torch.func.jvp and forward AD with a backward in the same pass."""
    n, lq, c, cv = 4, 18, 16, 8
    dev, s = kernel_device(), c**-0.5
    primals, tangents, g = _layer_inputs(n, lq, c, cv, dtype=torch.float32)
    primals, tangents, g = [x.to(dev) for x in primals], [x.to(dev) for x in tangents], g.to(dev)
    mask = _masks(n).to(dev)

    def kernel(a, b, w):
        a, b, w = (x.unsqueeze(1) for x in (a, b, w))
        return attn_mod._TritonAttention.apply(a, b, w, s, BLOCKS, mask)[0].squeeze(1)

    got = _derivatives(kernel, primals, tangents, g)
    ref = _derivatives(lambda a, b, w: attn_mod._Attention.apply(a, b, w, s, ~mask)[0], primals, tangents, g)
    for a, b in zip(got, ref, strict=True):
        _close(a, b)
        assert not a.isnan().any()
    assert all(not x[1].any() for x in got)


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 4 * 2.0**-11), (torch.bfloat16, 4 * 2.0**-8)])
def test_half_precision_kernels_with_a_key_mask(kernels, dtype, bound):
    """Half-precision inputs against the float32 math path on the same rounded values: relative errors below 4 unit
    roundoffs, as in tests/test_attention_triton.py; the row without real keys exactly 0, with lse -inf."""
    b, n, d = 4, 17, 32
    dev, s = kernel_device(), d**-0.5
    half = [_rand(b, 1, ln, d, seed=i, dtype=torch.float32).to(dev, dtype) for i, ln in enumerate((n, LK, LK) * 2)]
    exact = [x.float().cpu() for x in half]
    mask = _masks(b)
    o, t, lse = kernels.attention_forward(*half, scale=s, blocks=BLOCKS, key_mask=mask.to(dev))
    ref_o, ref_t, ref_lse = attention_jvp(*exact, key_mask=mask, backend="math", return_lse=True)
    rel = lambda a, r: float((a.double().cpu() - r.double()).norm() / r.double().norm())  # noqa: E731
    assert rel(o, ref_o) < bound and rel(t, ref_t) < bound
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-4, rtol=1e-5)  # float32 statistics throughout
    assert not o[1].any() and not t[1].any() and (lse[1] == -math.inf).all()
    g = _rand(*o.shape, seed=20, dtype=torch.float32).to(dev, dtype)
    grads = kernels.attention_backward(*half[:3], o, lse, g, scale=s, blocks=BLOCKS, key_mask=mask.to(dev))
    leaves = [x[:, 0].clone().requires_grad_() for x in exact[:3]]
    ref = torch.autograd.grad(attention(*leaves, key_mask=mask), leaves, g[:, 0].float().cpu())
    for a, r in zip(grads, ref, strict=True):
        assert a.dtype == dtype and not a.isnan().any() and rel(a[:, 0], r) < bound


def test_kernels_with_an_all_real_mask_equal_the_unmasked_kernels(kernels):
    """Masking no key runs the same arithmetic as no mask (the HAS_MASK variants only guard rows without keys)."""
    dev = kernel_device()
    x = [_rand(2, 1, ln, 16, seed=i, dtype=torch.float32).to(dev) for i, ln in enumerate((9, LK, LK) * 2)]
    full = torch.ones(2, LK, dtype=torch.bool, device=dev)
    plain = kernels.attention_forward(*x, scale=0.25, blocks=BLOCKS)
    masked = kernels.attention_forward(*x, scale=0.25, blocks=BLOCKS, key_mask=full)
    for a, b in zip(masked, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # equal in the interpreter; a compiler may reorder
