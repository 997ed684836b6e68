"""scm's Triton attention kernels against float64 math, with and without key padding masks, on a GPU.

    python benchmarks/kernel_check.py            # CUDA: the shapes below, fp32 and bf16
    python benchmarks/kernel_check.py --small    # CPU, Triton's interpreter: a small shape (a check of this script)

For each shape and input dtype: O, the fused tangent tO and the log-sum-exp of `attention_jvp(backend="triton")`
against `attention_jvp(backend="math")` in float64 on the same rounded inputs, and the layer op the networks
call (`attention`, heads folded into the batch): its O and tangent under forward AD, torch.func.jvp's
tangent, and the gradients of ⟨O, G⟩ against float64 autograd of the math op. Masks are those of padded prompts:
each batch row keeps a random number of real keys, one row none at all (its output, tangent and gradients must be
exactly 0 and its log-sum-exp -inf). Relative errors ‖err‖ / ‖ref‖; bounds: fp32 2e-5 (kernel products in "ieee"
precision: a few ulp × √Nk), bf16 5 u with u = 2⁻⁸ (the kernel rounds P and P ⊙ tS to bf16 as FlashAttention
does: measured 0.5–1.6 u in tests/test_attention_triton.py). Exits non-zero on any bound exceeded.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.autograd.forward_ad as fwAD

BOUNDS = {torch.float32: 2e-5, torch.bfloat16: 5 * 2.0**-8}
SHAPES = [  # batch, heads, queries, keys, d, dv, masked
    (2, 4, 1000, 1000, 64, 64, False), (1, 4, 257, 200, 128, 128, False), (2, 2, 300, 300, 32, 48, False),
    (4, 16, 256, 120, 72, 72, True),    # DiT-XL/2-text: 1152 wide, 16 heads, 16×16 tokens, 120-token prompts
    (3, 8, 1024, 300, 64, 64, True), (3, 4, 257, 77, 128, 128, True)]
SMALL = [(2, 2, 40, 37, 32, 32, False), (3, 2, 40, 37, 32, 32, True)]


def rel(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.detach().double(), q.detach().double()
    return float((p - q).norm() / q.norm().clamp_min(1e-300))


def prompt_mask(b: int, nk: int, gen: torch.Generator, device) -> torch.Tensor:
    """Padded prompts: row 0 has no real key, the others a random number (at least one)."""
    real = torch.randint(1, nk + 1, (b,), generator=gen, device=device)
    real[0] = 0
    return torch.arange(nk, device=device)[None, :] < real[:, None]


def check_layer(xs, ref, mask, h: int, dtype) -> dict:
    """The networks' op (heads folded; on CUDA it must take the kernels, on the CPU it runs its math path, which
    checks this script): forward-AD O and tangent, func.jvp, gradients."""
    import scm.nets.attention as A

    b, d = xs[0].shape[0], xs[0].shape[-1]
    fold = lambda a: a.reshape(b * h, *a.shape[2:])  # noqa: E731
    q, k, v, tq, tk, tv = map(fold, xs)
    layer_mask = None if mask is None else mask.repeat_interleave(h, 0)
    assert A._on_kernels(q, k, v) or not q.is_cuda, "the layer op did not take the kernels"
    op = lambda q, k, v: A.attention(q, k, v, key_mask=layer_mask)  # noqa: E731
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with fwAD.dual_level():
        out, t_out = fwAD.unpack_dual(op(*(fwAD.make_dual(x, t) for x, t in zip(leaves, (tq, tk, tv), strict=True))))
        g_out = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device)
        grads = torch.autograd.grad(out, leaves, g_out.to(dtype))
    _, t_func = torch.func.jvp(op, (q, k, v), (tq, tk, tv))
    ref_leaves = [fold(x).clone().requires_grad_() for x in ref[:3]]
    pad = None if layer_mask is None else ~layer_mask
    grads_ref = torch.autograd.grad(A._Attention.apply(*ref_leaves, d**-0.5, pad)[0], ref_leaves, g_out.double())
    o_ref, t_ref = ref[6], ref[7]
    errs = {"layer O": rel(out, fold(o_ref)), "layer tO": rel(t_out, fold(t_ref)), "func tO": rel(t_func, fold(t_ref))}
    errs |= {f"d{name}": rel(gr, gr_ref) for name, gr, gr_ref in zip("qkv", grads, grads_ref, strict=True)}
    if layer_mask is not None:  # the all-padding rows: exactly zero output, tangent and query gradient
        empty = ~layer_mask.any(-1)
        assert not out[empty].any() and not t_out[empty].any() and not grads[0][empty].any(), "all-padding rows"
    return errs


def check(shape, dtype, device) -> dict:
    from scm.nets.attention import attention_jvp

    b, h, n, nk, d, dv, masked = shape
    gen = torch.Generator(device).manual_seed(n * 7 + nk)
    dims = [(b, h, n, d), (b, h, nk, d), (b, h, nk, dv)] * 2
    xs = [torch.randn(s, generator=gen, device=device).to(dtype) for s in dims]
    mask = prompt_mask(b, nk, gen, device) if masked else None
    ref = [x.double() for x in xs]  # float64 math on the same rounded inputs
    o_r, t_r, l_r = attention_jvp(*ref, backend="math", return_lse=True, key_mask=mask)
    o, t, lse = attention_jvp(*xs, backend="triton", return_lse=True, key_mask=mask)
    inf = torch.isinf(l_r)
    assert torch.equal(inf, torch.isinf(lse)), "log-sum-exp: -inf exactly where every key is padding"
    errs = {"O": rel(o, o_r), "tO": rel(t, t_r), "lse (max abs)": float((lse.double() - l_r)[~inf].abs().max())}
    return errs | check_layer(xs, [*ref, o_r, t_r], mask, h, dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small shapes on the CPU in Triton's interpreter")
    args = ap.parse_args()
    if args.small:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    import triton

    on_gpu = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if on_gpu else "cpu")
    print("triton", triton.__version__, "torch", torch.__version__,
          torch.cuda.get_device_name(0) if on_gpu else "CPU (Triton's interpreter)")
    worst = {}
    for dtype in BOUNDS:
        for shape in SMALL if args.small else SHAPES:
            errs = check(shape, dtype, device)
            b, h, n, nk, d, dv, masked = shape
            print(f"{dtype!s:15} B={b} H={h} N={n} Nk={nk} d={d} dv={dv}{' masked' if masked else ''}: "
                  + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()), flush=True)
            worst[dtype] = max(worst.get(dtype, 0.0), *(e for k, e in errs.items() if not k.startswith("lse")))
            if errs["lse (max abs)"] > 1e-4:
                print(f"FAILED: log-sum-exp off by {errs['lse (max abs)']:.1e}")
                return 1
    print("worst relative errors:", {str(k): f"{v:.1e}" for k, v in worst.items()})
    failed = [str(dt) for dt, bound in BOUNDS.items() if worst[dt] >= bound]
    print("FAILED: " + ", ".join(failed) if failed else "attention kernels: OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
