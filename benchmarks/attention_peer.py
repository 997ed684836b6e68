"""Attention's JVP as training runs it, side by side: scm's kernels, the pip package `jvp-flash-attention` (a public
Triton kernel with a forward-mode rule, `JVPAttn.fwd_dual`) and PyTorch's SDPA math path under forward-mode AD (what
any model gets without a kernel), bf16 on a GPU.

    python benchmarks/attention_peer.py [--tokens 1024 … 16384] [--dims 64 128] [--batch 2] [--heads 8] [--budget-s S]
    python benchmarks/attention_peer.py --quick     # CPU smoke test of this script (timings and the peer mean nothing)

The peer is optional (`pip install jvp-flash-attention`; on the GPU machine carried as a wheel, see
benchmarks/gpu_owed.sh); without it its rows say so. Per (N, d), self-attention on [batch, heads, N, d], from dual
inputs q, k, v (tangents tq, tk, tv):

- **forward + tangent**: O and tO, no autograd graph (sCM's separate tangent pass);
- **+ backward**: the same with q, k, v requiring grad, then the gradients of ⟨O, G⟩ for a random G (the fused
  training pass: the tangent enters the loss as a stop-gradient target, so only O is backpropagated).

Each is timed round-robin (median and min over --repeats after a warm-up that also compiles) with its peak extra
memory (max_memory_allocated above the inputs), and checked against float32 math on the same bf16 inputs (scm's
blocked math path, `_Attention`, under forward AD and autograd): relative Frobenius errors of O, tO and dq, so that
speeds are compared at equal correctness. A case that fails (out of memory, a kernel that does not compile) is
recorded with its error and the table goes on. Results are rewritten after every (N, d), so a run stopped at its
limit keeps what it measured. Writes benchmarks/results/<name>.{json,md} (default attention_peer[-quick]).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from attention_jvp import peak_extra_mib
from common import RESULTS, time_interleaved, write_results

from scm.app.report import Report

PASSES = ("forward + tangent", "+ backward")


def folded(op, *xs: torch.Tensor) -> torch.Tensor:
    """op on [B·H, N, d] (the layout of scm's attention ops) applied to [B, H, N, d] inputs."""
    b, h = xs[0].shape[:2]
    out = op(*(x.reshape(b * h, *x.shape[2:]) for x in xs))
    return out.reshape(b, h, *out.shape[1:])


def scm_op(q, k, v):
    """scm's attention layer op (the one its networks call)."""
    from scm.nets.attention import attention

    return folded(attention, q, k, v)


def sdpa_math_op(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def peer_op():
    """The peer's forward-mode op, or the reason it cannot run."""
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn
    except ImportError as e:
        return None, f"not installed (pip install jvp-flash-attention): {e}"
    return JVPAttn.fwd_dual, None


def reference_op(q, k, v):
    """float32 math (blocked, memory-safe), independent of every kernel timed here."""
    from scm.nets.attention import _Attention

    return folded(lambda *x: _Attention.apply(*x, q.shape[-1] ** -0.5, None)[0], q, k, v)


def run(op, xs, g=None):
    """O, tO (and, given the output gradient g, dq, dk, dv) of `op` from dual inputs."""
    q, k, v, tq, tk, tv = xs
    leaves = [x.detach().requires_grad_(g is not None) for x in (q, k, v)]
    with fwAD.dual_level():
        out = op(*(fwAD.make_dual(x, t) for x, t in zip(leaves, (tq, tk, tv), strict=True)))
        o, t_o = fwAD.unpack_dual(out)
        grads = torch.autograd.grad(o, leaves, g) if g is not None else None
    return o.detach(), t_o, grads


def rel(a, ref) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def case(ops: dict, xs, g, ref, device, repeats: int, warmup: int) -> dict:
    """Errors, times and peak memory of each op's two passes; failures recorded per op."""
    results, fns = {}, {}
    for name, op in ops.items():
        if isinstance(op, str):
            results[name] = {"error": op}
            continue
        try:
            o, t_o, grads = run(op, xs, g)
            results[name] = {"rel_err_O": rel(o, ref[0]), "rel_err_tO": rel(t_o, ref[1]),
                             "rel_err_dq": rel(grads[0], ref[2])}
            del o, t_o, grads
            for p, grad in zip(PASSES, (None, g), strict=True):
                fns[(name, p)] = lambda op=op, grad=grad: run(op, xs, grad)
                results[name][p] = {"peak_extra_mib": peak_extra_mib(fns[(name, p)], device)}
        except Exception as e:  # out of memory, a kernel that cannot compile: recorded, the others go on
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            fns = {key: fn for key, fn in fns.items() if key[0] != name}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for (name, p), timing in time_interleaved(fns, device, repeats, warmup).items():
        results[name][p] |= timing
    return results


def table_rows(rows: list) -> list:
    out = []
    for row in rows:
        for name, r in row["results"].items():
            if "error" in r:
                out.append([row["tokens"], row["head_dim"], name, "–", "–", "–", r["error"]])
                continue
            ms = " / ".join(f"{r[p]['median_ms']:.3f}" for p in PASSES)
            mib = " / ".join("–" if r[p]["peak_extra_mib"] is None else f"{r[p]['peak_extra_mib']:.0f}" for p in PASSES)
            errs = f"{r['rel_err_O']:.1e} / {r['rel_err_tO']:.1e} / {r['rel_err_dq']:.1e}"
            speed = row.get("scm_speedup_over_peer")
            out.append([row["tokens"], row["head_dim"], name, ms, mib, errs,
                        f"{speed[0]:.2f}× / {speed[1]:.2f}×" if speed and name == "scm" else ""])
    return out


def write(args, rows: list, peer_error: str | None, interpreter: bool) -> None:
    dtype = str(args.dtype).removeprefix("torch.")
    report = Report(f"Attention JVP for training: scm vs jvp-flash-attention vs SDPA math + forward AD ({dtype}, "
                    f"batch {args.batch}, {args.heads} heads, self-attention)")
    report.table(["N", "d", "implementation", "ms: forward + tangent / + backward", "peak extra MiB (same)",
                  "rel. error O / tO / dq vs fp32 math", "scm ÷ peer time (speed-up) / notes"], table_rows(rows))
    report.text("scm: the attention layer op its networks call (`scm.nets.attention.attention`; on CUDA the fused "
                "Triton forward + tangent and the FlashAttention-2 backward; on the CPU the math path). Peer: "
                "`jvp_flash_attention.jvp_attention.JVPAttn.fwd_dual`. SDPA math: "
                "`F.scaled_dot_product_attention` under `sdpa_kernel(SDPBackend.MATH)` with dual inputs. "
                "Errors: against float32 math (scm's blocked `_Attention`) on the same bf16 inputs.")
    if peer_error:
        report.text(f"Peer: {peer_error}")
    if args.quick:
        report.text("**Smoke test on the CPU: the timings mean nothing, and scm runs its math path there.**")
    payload = {"dtype": dtype, "batch": args.batch, "heads": args.heads, "quick": args.quick, "rows": rows,
               "interpreter": interpreter, "peer_error": peer_error}
    json_path, md_path = write_results(args.name or ("attention_peer-quick" if args.quick else "attention_peer"),
                                       payload, report, out_dir=args.out)
    print(f"wrote {json_path} and {md_path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new (N, d) after this many seconds")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (Triton's interpreter)")
    ap.add_argument("--name", default=None, help="result file stem (default attention_peer[-quick])")
    ap.add_argument("--out", type=Path, default=RESULTS, help="result directory")
    args = ap.parse_args()
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
        args.device, args.batch, args.heads, args.tokens, args.dims, args.repeats = "cpu", 1, 2, [64, 128], [32], 1
    device = torch.device(args.device)
    if device.type != "cuda" and not args.quick:
        sys.exit("timings need a GPU: run with --device cuda (or --quick for a smoke test of this script)")
    args.dtype = torch.bfloat16
    peer, peer_error = peer_op()
    ops = {"scm": scm_op, "jvp-flash-attention": peer or peer_error, "SDPA math + forward AD": sdpa_math_op}
    rows, start = [], time.perf_counter()
    for d in args.dims:
        for n in args.tokens:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                print(f"budget of {args.budget_s:g} s spent: N={n} d={d} and after not run", flush=True)
                break
            rows.append(measure(args, ops, n, d, device))
            write(args, rows, peer_error, os.environ.get("TRITON_INTERPRET") == "1")
    if not rows:
        sys.exit("nothing measured")


def measure(args, ops: dict, n: int, d: int, device: torch.device) -> dict:
    gen = torch.Generator(device).manual_seed(n * 1000 + d)
    xs = [torch.randn(args.batch, args.heads, n, d, generator=gen, device=device).to(args.dtype) for _ in range(6)]
    g = torch.randn(xs[0].shape, generator=gen, device=device).to(args.dtype)
    o, t_o, grads = run(reference_op, [x.float() for x in xs], g.float())
    results = case(ops, xs, g, (o, t_o, grads[0]), device, args.repeats, warmup=1 if args.quick else 2)
    row = {"tokens": n, "head_dim": d, "results": results}
    mine, peer = results["scm"], results["jvp-flash-attention"]
    if "error" not in mine and "error" not in peer:
        row["scm_speedup_over_peer"] = [peer[p]["median_ms"] / mine[p]["median_ms"] for p in PASSES]
    summary = ", ".join(f"{name} " + ("failed" if "error" in r else " / ".join(f"{r[p]['median_ms']:.3f}"
                                                                                for p in PASSES))
                        for name, r in results.items())
    print(f"N={n} d={d} (ms, forward + tangent / + backward): {summary}", flush=True)
    return row


if __name__ == "__main__":
    main()
