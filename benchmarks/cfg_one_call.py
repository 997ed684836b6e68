"""Classifier-free guidance in one call or two: the guided evaluation of a conditional network (conditional and
unconditional evaluations, `scm.conditioning.guided`), stacked into one call of twice the batch or run as two calls,
per batch.

    python benchmarks/cfg_one_call.py [--teacher demo/text-teacher] [--batch 8 32 64 128 256] [--device cpu|cuda]
                                      [--precision fp32|bf16] [--repeats 7] [--name cfg_one_call[-<device>]]
    python benchmarks/cfg_one_call.py --teacher demo/teacher --batch 1 8 32 64 128 --name cfg_one_call-labels

One call reads the weights and launches the kernels once for both halves; two calls keep the working set half as
large. The network is a committed teacher: the text teacher (`dit-tiny-text`, 16-token prompts; the unconditional
rows are the empty prompt) or the image demo's class-conditional U-Net (`tiny`, 10 digits; the unconditional rows
are `NO_CLASS`). Its guided evaluation at s = 2 is timed both ways in alternation (round-robin medians), in no-grad
mode. The figures decide where `scm.generate` stacks the two evaluations (`max_stacked`). Writes
benchmarks/results/<--name>.{json,md}.
"""

from __future__ import annotations

import argparse

import torch
from common import time_interleaved, write_results

from scm.app.report import Report
from scm.conditioning import Conditioning, guided
from scm.precision import PRECISIONS
from scm.runs import load_run


def guided_calls(run, batch: int, device, half) -> dict:
    """The guided evaluation at `batch`, one call and two calls, as functions of nothing."""
    conditioning = Conditioning.of_run(run.cfg)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *run.cfg.shape, generator=g).to(device)
    t = (0.1 + 1.4 * torch.rand(batch, generator=g)).to(device)
    prompts = ["a thick seven"] * batch if conditioning.text else None  # else class i mod 10 for image i
    cond = conditioning.sample_inputs(torch.arange(batch, device=device), prompts=prompts)
    cond.pop("guidance", None)
    fns = {}
    for name, one in (("one call", True), ("two calls", False)):
        fn = guided(run.net, conditioning.null(), one_call=one)

        @torch.no_grad()
        def call(fn=fn):
            with torch.autocast(device.type, dtype=half, enabled=half is not None):
                return fn(x, t, guidance=2.0, **cond)

        fns[name] = call
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="demo/text-teacher", help="a text-conditioned diffusion run")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    half = PRECISIONS[args.precision] if args.precision != "fp32" else None
    run = load_run(args.teacher)
    run.net.to(device).eval()
    rows = []
    for batch in args.batch:
        timed = time_interleaved(guided_calls(run, batch, device, half), device, args.repeats)
        one, two = timed["one call"]["median_ms"], timed["two calls"]["median_ms"]
        rows.append({"batch": batch, "one_call_ms": one, "two_calls_ms": two, "ratio": one / two})
        print(f"batch {batch}: one call {one:.1f} ms, two calls {two:.1f} ms, ratio {one / two:.2f}", flush=True)
    report = Report(f"Classifier-free guidance in one call or two (`{args.teacher}`, {args.precision}, {device})")
    report.table(["batch", "one call (ms)", "two calls (ms)", "one ÷ two"],
                 [[r["batch"], f"{r['one_call_ms']:.1f}", f"{r['two_calls_ms']:.1f}", f"{r['ratio']:.2f}"]
                  for r in rows])
    null = "empty-prompt" if Conditioning.of_run(run.cfg).text else "no-class"
    report.text(f"One call stacks the conditional and {null} rows into a batch of 2B; two calls evaluate B rows "
                "twice. Below 1: one call is faster.")
    name = args.name or "cfg_one_call" + ("" if device.type == "cpu" else f"-{device.type}")
    payload = {"teacher": args.teacher, "device": str(device), "precision": args.precision, "rows": rows}
    json_path, md_path = write_results(name, payload, report)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
