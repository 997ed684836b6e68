"""Tune the attention kernels' launch configurations on this card and measure them against the goals: the forward
(O and log-sum-exp, what training's forward runs) within 1.2× PyTorch's SDPA flash forward at N = 4096, and the
fused forward + tangent kernel at head dim 128 within 2.5× its head-dim-64 time per FLOP (twice the FLOPs, so a
time ratio of at most 5).

    python benchmarks/kernel_tune.py [--n 4096] [--dims 64 128] [--batch 4] [--heads 16] [--budget-s S] [--table F]
    python benchmarks/kernel_tune.py --quick     # CPU dry run of this script (Triton's interpreter; times mean nothing)

For each kernel, most important first (fused forward + tangent, forward, tangent from a saved O, the two backward
kernels) and head dim, `scm.nets.attention_tuning.tune` times the configuration the kernels pick today (the card's
table entry, else the first of the default list that fits) and a search space of block shapes, warps and stages,
keeping only configurations whose outputs equal the default's to the dtype's rounding. SDPA's flash forward is timed
on the same inputs. Results are rewritten after every kernel, so a run stopped at its limit keeps what it measured.
Writes <out>/kernel_tune[-quick].{json,md}; --table F also merges the fastest configurations into the table F for
this card (commit it as src/scm/nets/attention_tuning.json once reviewed; users tune their own card with `scm kernels
tune` and point SCM_ATTENTION_TUNING at the file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before Triton defines the kernels

import torch
import torch.nn.functional as F
from common import RESULTS, write_results

from scm.app.report import Report
from scm.nets import attention_triton as kernels
from scm.nets import attention_tuning as tuning

ORDER = ("fwd_tangent", "fwd", "tangent", "dkdv", "dq")
QUICK_SPACE = ((16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1))


def sdpa_flash_ms(args, d: int, device: torch.device) -> float | None:
    """PyTorch's SDPA forward on the same shapes (the flash kernel on CUDA; None where it does not run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, args.n, d, generator=g).to(device, args.dtype) for _ in range(3))
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    try:
        with sdpa_kernel(backend):
            return tuning._time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)
    except RuntimeError as e:
        print(f"SDPA flash forward at d={d}: {e}", flush=True)
        return None


def default_config(kernel: str, dtype: torch.dtype, d: int) -> list | None:
    """The configuration the kernels launched with by default (remembered by attention_triton)."""
    block = max(16, 1 << (d - 1).bit_length())
    chosen = [c for key, c in kernels._CHOSEN.items() if key[0] == kernel and key[1] == dtype and key[3] == block]
    return list(chosen[-1]) if chosen else None


def fastest(r: dict) -> float:
    """The time with the configuration the table would keep (the default's where the search found nothing faster)."""
    return min(r["default_ms"], r["best_ms"] or r["default_ms"])


def goals(results: dict, sdpa: dict, dtype: torch.dtype) -> dict:
    """The two ratios the kernels are held to, by default and with the fastest configuration found."""
    out = {}
    for d, flash in sdpa.items():
        r = results.get(tuning.table_key("fwd", dtype, d, d))
        if r and flash:
            out[f"fwd ÷ SDPA flash, d={d}"] = {"default": r["default_ms"] / flash, "tuned": fastest(r) / flash,
                                              "goal": 1.2}
    r64, r128 = (results.get(tuning.table_key("fwd_tangent", dtype, d, d)) for d in (64, 128))
    if r64 and r128:
        per_flop = lambda a, b: a / b / 2  # noqa: E731 (d = 128 does twice the FLOPs of d = 64)
        out["fused tangent d=128 ÷ d=64, per FLOP"] = {
            "default": per_flop(r128["default_ms"], r64["default_ms"]),
            "tuned": per_flop(fastest(r128), fastest(r64)),
            "goal": 2.5}
    return out


def report(args, results: dict, sdpa: dict, card: str) -> Report:
    dtype = str(args.dtype).removeprefix("torch.")
    r = Report(f"Attention kernels' launch configurations on {card} ({dtype}, N = {args.n}, batch {args.batch}, "
               f"{args.heads} heads, self-attention)")
    r.text("Per kernel and head dim: the configuration the kernels pick by default (the card's table entry, else the "
           "first of the default list that fits) and the fastest of the search space whose outputs equal the "
           "default's (BLOCK_M, BLOCK_N, warps, stages); median ms by triton.testing.do_bench. "
           + ("CPU dry run in Triton's interpreter: the times mean nothing." if args.quick else ""))
    rows, kept = [], tuning.best_configs(results)
    for key, res in results.items():
        ok = sum(isinstance(ms, float) for _, ms in res["tried"])
        speed = f"{res['default_ms'] / res['best_ms']:.2f}×" if res["best_ms"] else "–"
        rows.append([key, res.get("default_config"), f"{res['default_ms']:.4f}", res["best"],
                     f"{res['best_ms']:.4f}" if res["best_ms"] else "–", speed, f"{ok} / {len(res['tried'])}",
                     "yes" if key in kept else "no"])
    r.table(["kernel/dtype/dims", "default config", "default ms", "fastest searched", "its ms", "speed-up",
             "configs that ran / tried", "in the table"], rows)
    r.text("A configuration enters the table only when it is more than 3 % faster than the default (do_bench's "
           "medians vary by 1–2 % between calls).")
    rows = [[name, f"{g['default']:.2f}", f"{g['tuned']:.2f}", f"≤ {g['goal']}"]
            for name, g in goals(results, sdpa, args.dtype).items()]
    r.heading("The goals", 3).table(["ratio", "default", "tuned", "goal"], rows)
    r.text("SDPA forward (ms): " + ", ".join(f"d={d}: {ms:.4f}" if ms else f"d={d}: did not run"
                                             for d, ms in sdpa.items()))
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget-s", type=float, default=None, help="stop the search after this many seconds")
    p.add_argument("--table", type=Path, default=None, help="merge the fastest configurations into this table file")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="CPU dry run in Triton's interpreter, tiny shapes")
    args = p.parse_args()
    if args.quick:
        args.n, args.dims, args.batch, args.heads, args.dtype = 40, [12, 20], 1, 2, "float32"
    elif not torch.cuda.is_available():
        sys.exit("kernel_tune.py times kernels on a CUDA card (--quick: a CPU dry run of the script)")
    args.dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = tuning.card_name(device)
    name = "kernel_tune-quick" if args.quick else "kernel_tune"
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    sdpa = {max(16, 1 << (d - 1).bit_length()): sdpa_flash_ms(args, d, device) for d in args.dims}
    results: dict = {}
    try:
        for kernel in ORDER:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            found = tuning.tune(args.dims, args.n, args.batch, args.heads, args.dtype, device, kernels=(kernel,),
                                space=QUICK_SPACE if args.quick else tuning.SEARCH_SPACE, budget_s=left,
                                log=lambda s: print(s, flush=True))
            for key, res in found.items():
                results[key] = {"default_config": default_config(kernel, args.dtype, res["d"]), **res}
            write(args, name, results, sdpa, card)
    except KeyboardInterrupt:  # the GPU script's time cap: keep what was measured
        print("interrupted: writing what was measured", flush=True)
    write(args, name, results, sdpa, card)


def write(args, name: str, results: dict, sdpa: dict, card: str) -> None:
    payload = {"card": card, "n": args.n, "batch": args.batch, "heads": args.heads,
               "dtype": str(args.dtype).removeprefix("torch."), "results": results,
               "sdpa_forward_ms": sdpa, "goals": goals(results, sdpa, args.dtype)}
    write_results(name, payload, report(args, results, sdpa, card), args.out)
    if args.table is not None and tuning.best_configs(results):
        measured = (f"benchmarks/kernel_tune.py, N = {args.n}, batch {args.batch}, {args.heads} heads, "
                    f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}")
        tuning.write_table(args.table, card, tuning.best_configs(results), measured)


if __name__ == "__main__":
    main()
