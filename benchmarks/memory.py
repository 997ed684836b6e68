"""Peak memory and step time of sCD for diffusers students, with and without activation checkpointing.

    python benchmarks/memory.py [--size tiny|real] [--device cpu|cuda] [--batches 4,16] [--repeats 3] [--budget-s S]
                                [--nets sd3,sana] [--variants 5,4,3,2,1] [--out DIR]

Each case (a student × batch × variant) runs in a fresh process: the teacher (no grad) and the student are built,
one sCD step (guided teacher, guidance-conditioned student, backward, Adam update) warms up, then `--repeats` steps
are timed. Memory: on CUDA the allocator's peak (`max_memory_allocated`) during the timed steps above what was
allocated before them (the weights, optimizer state and teacher are not counted); on the CPU the process's peak
resident set (VmHWM) above its resident set before the first step: PyTorch's CPU allocator keeps no statistics,
so this counts everything the step touched, activations first.

Variants: the fused pass (the default step), the separate tangent pass (a no-grad JVP pass, then the forward of F),
and the separate pass with every block checkpointed (`net.checkpointing=true`, which a run pairs with the separate
pass); and LoRA students (adapters of rank `--rank` on the teacher's frozen network, which is also the teacher),
with and without checkpointed blocks.

`--size tiny`: small random SD3-like and Sana-like transformers (CPU, minutes); `--size real`: SD3-medium and
Sana-1.6B configurations (random weights) at 1024² latents in bf16, for a GPU (`benchmarks/t2i_cost.py` holds the
configurations). Writes benchmarks/results/memory-<size>-<device>.{json,md}, again after every case (a run stopped
at its limit keeps what it measured; with --budget-s the cases it had no time for are listed as not run).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, machine, write_results

from scm.app.report import Report

VARIANTS = {"fused pass": dict(fused=True, checkpointing=False, lora=False),
            "separate tangent pass": dict(fused=False, checkpointing=False, lora=False),
            "separate pass + checkpointed blocks": dict(fused=False, checkpointing=True, lora=False),
            "LoRA, separate pass": dict(fused=False, checkpointing=False, lora=True),
            "LoRA + checkpointed blocks": dict(fused=False, checkpointing=True, lora=True)}

TINY = {  # (class, config, latent shape (C, H, W), prompt tokens, token width, pooled width, scheduler)
    "sd3-like": ("SD3Transformer2DModel", dict(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=64,
        pos_embed_max_size=32), (16, 32, 32), 64, 128, 64, "flow"),
    "sana-like": ("SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=4, attention_head_dim=32, num_layers=8,
        num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=128,
        sample_size=32, patch_size=1), (32, 32, 32), 64, 128, 0, "flow"),
}


def _networks(name: str, size: str):
    if size == "real":  # the published configurations, rebuilt (random weights): benchmarks/t2i_cost.py's
        from t2i_cost import real_specs, widths

        spec = real_specs()[name]
        width, pooled = widths(spec)
        return spec.model_class, spec.config, spec.shape, spec.tokens, width, pooled, "flow"
    return TINY[name]


def make_step(name: str, variant: str, batch: int, size: str, device: torch.device, rank: int):
    """One sCD training step of the student `name` (fresh random teacher weights; the student is its copy, or for
    LoRA its adapters of rank `rank` on the teacher's network, which then is the teacher: held once)."""
    import diffusers

    from scm.diffusers import from_diffusers, student_from_diffusers
    from scm.diffusers.lora import BaseTeacher
    from scm.diffusers.net_config import LoRAConfig
    from scm.objectives import ConsistencyLoss

    cls, config, shape, tokens, width, pooled, _ = _networks(name, size)
    spec = VARIANTS[variant]
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    with torch.device(device):
        teacher = getattr(diffusers, cls)(**config).eval().requires_grad_(False)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    net = student_from_diffusers(teacher, scheduler, sigma_d=1.0, guidance_embed=True, shape=shape,
                                 checkpointing=spec["checkpointing"], lora=LoRAConfig(rank=rank if spec["lora"] else 0))
    fn = BaseTeacher(net) if spec["lora"] else from_diffusers(teacher, scheduler, sigma_d=1.0)
    held = [net] if spec["lora"] else [net, teacher]  # a LoRA student's teacher is its own base: the copy goes
    del teacher                                         # (scm.train.build does the same)
    objective = ConsistencyLoss(sigma_d=1.0, teacher=fn,
                                teacher_uncond={"text": torch.zeros(1, tokens, width, device=device)},
                                guidance=(1.0, 3.0), warmup_kimg=0, fused_pass=spec["fused"])
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, *shape, generator=g).to(device)
    cond = {"text": torch.randn(batch, tokens, width, generator=g).to(device),
            "text_mask": torch.ones(batch, tokens, dtype=torch.bool, device=device)}
    if pooled:
        cond["text_pooled"] = torch.randn(batch, pooled, generator=g).to(device)
        objective.teacher_uncond["text_pooled"] = torch.zeros(1, pooled, device=device)
    objective.teacher_uncond["text_mask"] = torch.ones(1, tokens, dtype=torch.bool, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = objective(net, x0, 100.0, generator=torch.Generator(device).manual_seed(0), **cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for m in held for p in m.parameters())
    # what the run holds besides activations: the networks' weights, and Adam's two moments of each trained weight
    step.sizes = {"trained_m": trained / 1e6, "weights_mb": weights / 2**20, "adam_mb": 2 * 4 * trained / 2**20}
    return step


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    device = torch.device(args.device)
    step = make_step(args.net, args.worker, args.batch, args.size, device, args.rank)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb("VmRSS")
    held = base / 2**20 if device.type == "cuda" else base
    times = []
    for _ in range(args.repeats + 1):  # the first step warms up (allocations, kernels); its time is dropped
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = ((torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda"
            else _rss_mb("VmHWM") - base)
    print(json.dumps({**step.sizes, "held_mb": held, "peak_mb": peak, "median_ms": 1000 * statistics.median(times[1:]),
                      "min_ms": 1000 * min(times[1:]), "max_ms": 1000 * max(times[1:])}))


def run_case(args, net: str, variant: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--net", net, "--batch", str(batch), "--size", args.size,
           "--device", args.device, "--repeats", str(args.repeats), "--rank", str(args.rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:300]}  # e.g. out of memory: recorded, the table goes on
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "real"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=None, help="the LoRA rank (default: 64 for real, 16 for tiny)")
    ap.add_argument("--nets", default=None, help="comma-separated students (default: all of the size)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    ap.add_argument("--variants", default=None,
                    help="the variants to run, in this order, as comma-separated numbers: "
                    + ", ".join(f"{i} = {name}" for i, name in enumerate(VARIANTS, 1)))
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--net", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rank = args.rank or (64 if args.size == "real" else 16)
    if args.worker:
        return worker(args)
    nets = args.nets.split(",") if args.nets else (list(TINY) if args.size == "tiny" else ["sd3", "sana"])
    try:
        variants = [list(VARIANTS)[int(i) - 1] for i in args.variants.split(",")] if args.variants else list(VARIANTS)
    except (ValueError, IndexError):
        ap.error(f"--variants {args.variants!r}: comma-separated numbers from 1 to {len(VARIANTS)}")
    rows, start = [], time.perf_counter()
    for net in nets:
        for batch in (int(b) for b in args.batches.split(",")):
            for variant in variants:
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    rows.append({"student": net, "batch": batch, "variant": variant,
                                 "error": f"not run: the budget of {args.budget_s:g} s was spent"})
                else:
                    rows.append({"student": net, "batch": batch, "variant": variant,
                                 **run_case(args, net, variant, batch)})
                print(json.dumps(rows[-1]), flush=True)
                md = _write(args, rows)  # after every case: a run stopped at its limit keeps what it measured
    print(md.read_text())


def _write(args, rows) -> Path:
    kind = "max_memory_allocated above the weights" if args.device != "cpu" else "peak RSS above the step's start"
    report = Report(f"sCD memory and step time: full fine-tuning and LoRA (r={args.rank}), with and without "
                    f"activation checkpointing ({args.size} students, {args.device})")
    report.table(["student", "batch", "variant", "trained M", "weights + Adam MB", f"step peak MB ({kind})",
                  "step ms (median, min–max)"],
                 [[r["student"], r["batch"], r["variant"], f"{r['trained_m']:.2f}" if "trained_m" in r else "–",
                   f"{r['weights_mb']:.0f} + {r['adam_mb']:.0f}" if "weights_mb" in r else "–",
                   f"{r['peak_mb']:.0f}" if "peak_mb" in r else r["error"],
                   f"{r['median_ms']:.0f} ({r['min_ms']:.0f}–{r['max_ms']:.0f})" if "median_ms" in r else "–"]
                  for r in rows])
    report.markdown_text(NOTES)
    payload = {"size": args.size, "device": args.device, "memory": kind, "repeats": args.repeats,
               "lora_rank": args.rank, "rows": rows,
               "machine": machine(), "command": " ".join(["python", *sys.argv])}
    name = f"memory-{args.size}-{torch.device(args.device).type}"
    return write_results(name, payload, report, out_dir=Path(args.out) if args.out else RESULTS)[1]


NOTES = """## Notes

- One process per case, so each peak is its own. The CPU figure is a resident-set high-water mark: it also holds
  the allocator's caches and the first step's transient buffers, so compare variants with each other, not with
  a model's parameter count.
- Checkpointing keeps each block's input only and recomputes the block in the backward pass; the tangent runs in
  its own no-grad pass, which stores nothing. Expected: the activation memory of the forward of F falls from all
  blocks' to about one block's, for one more forward of the student per step.
- The fused pass of a diffusers student held 2–3× the separate pass's memory and was no faster: diffusers' ops
  have no custom forward-AD rules, so the tangent's operations are recorded for the backward with the primal's
  (scm's own networks compute their tangents from detached values: benchmarks/results/step_cost.md). `scm train`
  therefore takes the separate pass for diffusers students unless `loss.fused_pass=true` is set.
- "weights + Adam": the bytes of the networks' weights held (full fine-tuning: the teacher and the student; LoRA:
  the teacher's network once, with its adapters: `scm.diffusers.lora`, the teacher is the student with its adapters
  off) and of Adam's two fp32 moments per trained weight, counted from the tensors. The step's peak is measured
  above what was there before the first step, and includes Adam's state (made at the warm-up step).
"""


if __name__ == "__main__":
    main()
