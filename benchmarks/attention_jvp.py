"""Cost of attention's tangent: the fused Triton kernel against the blocked math path (bf16, on a GPU).

    python benchmarks/attention_jvp.py --device cuda [--batch 4] [--heads 8] [--repeats 20]
    python benchmarks/attention_jvp.py --quick [--out DIR]    # CPU smoke test of this script (interpreter)

For N = 256 … 4096 tokens and head dims 64 and 128 (self-attention, [batch, heads, N, d]) it times, round-robin:
O and its tangent tO from `attention_jvp` on the math path and on the fused kernel (one pass; also with a key
padding mask whose last quarter of keys is padding: the cost of the masked variant), the kernel's
forward alone (O and the log-sum-exp) and PyTorch's SDPA forward for reference; the peak extra GPU memory of
each (max_memory_allocated above the inputs); and, in float32 at the same size, the largest absolute error of
the kernel's O and tO against the math path. Writes benchmarks/results/attention_jvp.{json,md}
(attention_jvp-quick with --quick). On the CPU the kernels run in Triton's interpreter, which is for
correctness only: without --quick the script refuses to time it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, machine, sync, time_interleaved, write_results

from scm.app.report import Report


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory allocated by one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU through Triton's interpreter")
    ap.add_argument("--name", default=None, help="result file stem (default attention_jvp[-quick])")
    ap.add_argument("--out", type=Path, default=RESULTS, help="result directory")
    args = ap.parse_args()

    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before scm.nets.attention_triton defines its kernels
        args.device, args.batch, args.heads, args.tokens, args.dims, args.repeats = "cpu", 1, 2, [24, 40], [32], 1
    device = torch.device(args.device)
    if device.type != "cuda" and not args.quick:
        sys.exit("the Triton interpreter checks correctness, it is no timing: run with --device cuda "
                 "(or --quick for a smoke test of this script)")
    from scm.nets import attention_triton
    from scm.nets.attention import attention_jvp

    if not attention_triton.available():
        sys.exit("Triton is not installed: pip install scm[triton]")
    dtype = torch.bfloat16
    b, h = args.batch, args.heads
    rows, table = [], []
    for d in args.dims:
        for n in args.tokens:
            gen = torch.Generator(device).manual_seed(n * 1000 + d)

            def randn(gen=gen, n=n, d=d):
                return torch.randn(b, h, n, d, generator=gen, device=device)

            q, k, v, tq, tk, tv = (randn() for _ in range(6))
            # correctness in float32: the fused kernel vs the math path
            o_k, t_k = attention_jvp(q, k, v, tq, tk, tv, backend="triton")
            o_m, t_m = attention_jvp(q, k, v, tq, tk, tv, backend="math")
            err_o, err_t = (o_k - o_m).abs().max().item(), (t_k - t_m).abs().max().item()
            t_scale = t_m.abs().max().item()
            del o_k, t_k, o_m, t_m
            q, k, v, tq, tk, tv = (x.to(dtype) for x in (q, k, v, tq, tk, tv))
            mask = (torch.arange(n, device=device) < 3 * n // 4).expand(b, n)  # the last quarter of keys padding
            fns = {
                "math tangent (O, tO)": lambda q=q, k=k, v=v, tq=tq, tk=tk, tv=tv: attention_jvp(
                    q, k, v, tq, tk, tv, backend="math"),
                "triton fused (O, tO)": lambda q=q, k=k, v=v, tq=tq, tk=tk, tv=tv: attention_jvp(
                    q, k, v, tq, tk, tv, backend="triton"),
                "triton fused, key mask (O, tO)": lambda q=q, k=k, v=v, tq=tq, tk=tk, tv=tv, m=mask: attention_jvp(
                    q, k, v, tq, tk, tv, backend="triton", key_mask=m),
                "triton forward (O)": lambda q=q, k=k, v=v, s=d**-0.5: attention_triton.forward_op(q, k, v, s),
            }
            if device.type == "cuda":
                fns["SDPA forward (O)"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
            timings = time_interleaved(fns, device, args.repeats, warmup=1 if args.quick else 3)
            for name, fn in fns.items():
                timings[name]["peak_extra_mib"] = peak_extra_mib(fn, device)
            row = {"tokens": n, "head_dim": d, "batch": b, "heads": h, "dtype": str(dtype).removeprefix("torch."),
                   "timings": timings, "fp32_max_abs_err_O": err_o, "fp32_max_abs_err_tO": err_t,
                   "fp32_max_abs_tO": t_scale,
                   "speedup_fused_over_math": timings["math tangent (O, tO)"]["median_ms"]
                   / timings["triton fused (O, tO)"]["median_ms"]}
            rows.append(row)
            for name, t in timings.items():
                mem = "–" if t["peak_extra_mib"] is None else f"{t['peak_extra_mib']:.1f}"
                table.append([n, d, name, f"{t['median_ms']:.3f}", f"{t['min_ms']:.3f}", mem,
                              f"{err_o:.1e} / {err_t:.1e}" if name == "triton fused (O, tO)" else ""])
            print(f"N={n} d={d}: math {timings['math tangent (O, tO)']['median_ms']:.3f} ms, fused "
                  f"{timings['triton fused (O, tO)']['median_ms']:.3f} ms, fp32 max err O {err_o:.1e} tO {err_t:.1e}")

    payload = {"device": str(device), "dtype": str(dtype), "quick": args.quick, "rows": rows,
               "interpreter": attention_triton.interpreting()}
    report = Report(f"Attention tangent: fused Triton kernel vs blocked math path ({payload['dtype']}, "
                    f"batch {b}, {h} heads, self-attention)")
    report.table(["N", "d", "pass", "median ms", "min ms", "peak extra MiB", "fp32 max abs err O / tO"], table)
    report.text("Math: `attention_jvp(backend=\"math\")`, query blocks of at most 4M logits over the batch. "
                "Triton fused: one kernel pass for O and tO (online softmax, three accumulators). "
                "With key mask: the same, the last quarter of the keys padding. Triton forward: O "
                "and the log-sum-exp only. Errors: the fused kernel against the math path, both in float32 "
                "(the kernel's fp32 products in \"ieee\" precision) on the same inputs; tO is of order "
                f"{max(r['fp32_max_abs_tO'] for r in rows):.0f} at most.")
    if args.quick:
        report.text("**Smoke test on the CPU through Triton's interpreter: the timings mean nothing.**")
    print(report.to_markdown())
    name = args.name or ("attention_jvp-quick" if args.quick else "attention_jvp")
    json_path, md_path = write_results(name, payload, report, out_dir=args.out)
    print(f"wrote {json_path} and {md_path}  (machine: {machine().get('gpu', machine()['cpu'])})")


if __name__ == "__main__":
    main()
