"""Cost of one training step: diffusion vs sCT vs sCD, same net and batch.

    python benchmarks/step_cost.py [--net tiny|dit-tiny|…] [--batch 64] [--res 28] [--channels 1] [--device cpu|cuda]
                                   [--precision fp32|bf16|fp16] [--text-tokens T] [--classes N] [--frames T]
                                   [--length L]

Video networks (`video-tiny`, `video-S`, …) take clips [C, --frames, --res, --res] (default: the preset's frames),
audio networks (`audio-tiny`, …) waveforms [C, --length].

A step is the objective (its passes through the network), the backward and an Adam update, as the training
loop runs it. Variants: the separate tangent pass (a no-grad JVP pass, then a training forward) and the fused
pass (one pass carries the autograd graph of F and the forward-mode tangent); and, for reference, sCT with
PyTorch's generic JVP formulas instead of scm's custom rules. A text network (`dit-tiny-text`, `DiT-XL/2-text`, …)
gets random prompts of --text-tokens tokens of its text width, padded at random lengths (at least a quarter real).
The variants share one network, its teacher and Adam (a DiT-XL/2 fits the card once, not once per variant). Timings
are round-robin medians. Peak memory: on the CPU the peak RSS of a fresh process per variant, all at once; on CUDA
max_memory_allocated above the shared state, one variant at a time in this process.
A text network's sCD, and a class-conditional one's (--classes N: random labels of N classes), also runs with a
guided teacher (CFG with the empty prompt or no class, s ~ U[1, 3]), its two evaluations in two calls or in one
(`loss.cfg_one_call`).
Writes benchmarks/results/step_cost[-<net>][-<device>].{json,md} (the `tiny` U-Net's without -<net>).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from common import awake, machine, time_interleaved, write_results
from jvp_cost import native_ops

from scm.app.report import Report
from scm.nets import NET_PRESETS, build_net, net_config
from scm.objectives import ConsistencyLoss, DiffusionLoss
from scm.precision import PRECISIONS

VARIANTS = {
    "diffusion": dict(kind="diffusion"),
    "sCT, separate tangent pass": dict(kind="sct", fused_pass=False),
    "sCT, fused pass": dict(kind="sct", fused_pass=True),
    "sCD, separate tangent pass": dict(kind="scd", fused_pass=False),
    "sCD, fused pass": dict(kind="scd", fused_pass=True),
    # a conditional network's sCD with a guided teacher (CFG, s ~ U[1, 3], the empty prompt or no class as the
    # unconditional input), its two evaluations as two calls or stacked into one (`loss.cfg_one_call`)
    "sCD, fused pass, CFG teacher in two calls": dict(kind="scd", fused_pass=True, cfg="two"),
    "sCD, fused pass, CFG teacher in one call": dict(kind="scd", fused_pass=True, cfg="one"),
    # sCD + VSD (§6): the same guided sCD step plus the student's one-step samples, the teacher's CFG and the
    # critic's evaluation at their noised copies, and the critic's diffusion loss and Adam update
    "sCD + VSD, fused pass, CFG teacher in one call": dict(kind="scd", fused_pass=True, cfg="one", vsd=True),
    "sCD, separate pass, checkpointed blocks": dict(kind="scd", fused_pass=False, checkpointing=True),
    "sCT, PyTorch-native JVP rules (naive)": dict(kind="sct", fused_pass=False, native=True),
}


@dataclasses.dataclass
class Bench:
    """What the variants of one run share: the network (stepped by every variant, at a learning rate that leaves it
    as it was for timing), an sCD teacher (a frozen copy), Adam, the images and their conditioning. One copy, so
    that a large network (DiT-XL/2) fits the card once, not once per variant."""

    cfg: object
    net: torch.nn.Module
    teacher: torch.nn.Module
    opt: torch.optim.Optimizer
    x0: torch.Tensor
    cond: dict


def make_bench(args, device) -> Bench:
    torch.manual_seed(0)
    cfg = net_config(args.net, **item_fields(args), **({"label_dim": args.classes} if args.classes else {}))
    net = awake(build_net(cfg, 0.5)).to(device)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    x0 = torch.rand(args.batch, *net.shape, device=device) * 2 - 1  # images, clips or waveforms
    cond = prompts(cfg, args.batch, getattr(args, "text_tokens", 16), device)
    if args.classes:
        cond["labels"] = torch.randint(0, args.classes, (args.batch,), generator=torch.Generator().manual_seed(2))
        cond["labels"] = cond["labels"].to(device)
    return Bench(cfg, net, teacher, torch.optim.Adam(net.parameters(), lr=1e-6), x0, cond)


def make_step(name: str, args, device, bench: Bench | None = None):
    """One training step of variant `name` (objective, backward, Adam, weight normalisation), on `bench`'s network
    (a new one by default)."""
    spec, b = VARIANTS[name], bench or make_bench(args, device)
    net, cfg = b.net, b.cfg
    if spec["kind"] == "diffusion":
        objective = DiffusionLoss()
    else:
        tokens = getattr(args, "text_tokens", 16)
        null = {"labels": None} if args.classes else empty_prompt_inputs(cfg, tokens, device)
        guidance = {"guidance": (1.0, 3.0), "teacher_uncond": null,
                    "cfg_one_call": spec["cfg"] == "one"} if spec.get("cfg") else {}
        objective = ConsistencyLoss(teacher=b.teacher if spec["kind"] == "scd" else None, warmup_kimg=0,
                                    fused_pass=spec["fused_pass"], vsd_weight=1.0 if spec.get("vsd") else 0.0,
                                    **guidance)
    critic, critic_opt = {}, None
    if spec.get("vsd"):  # a critic of its own (the teacher's copy, trained): twice the weights, for this variant only
        critic["critic"] = copy.deepcopy(b.teacher).requires_grad_(True).train()
        critic_opt = torch.optim.Adam(critic["critic"].parameters(), lr=1e-6)
    # activation checkpointing per block (net.checkpointing), same weights: the network reads it at each call
    variant_cfg = dataclasses.replace(cfg, checkpointing=True) if spec.get("checkpointing") else cfg
    ctx = native_ops if spec.get("native") else contextlib.nullcontext
    half = PRECISIONS[args.precision] if args.precision != "fp32" else None  # autocast, as scm.train.step

    def step():
        net.cfg = variant_cfg
        with ctx():
            with torch.autocast(device.type, dtype=half, enabled=half is not None):
                loss, _ = objective(net, b.x0, 100.0, generator=torch.Generator(device).manual_seed(0), **critic,
                                    **b.cond)
            loss.backward()
            for opt, module in [(b.opt, net)] + ([(critic_opt, critic["critic"])] if critic else []):
                opt.step()
                opt.zero_grad(set_to_none=True)
                if hasattr(module, "normalize_weights_"):
                    module.normalize_weights_()
        net.cfg = cfg

    return step


def item_fields(args) -> dict:
    """The network config's fields for the item shape the arguments ask for (images, clips or waveforms)."""
    fields = {"img_resolution": args.res, "img_channels": args.channels}
    kind = type(net_config(args.net)).__name__
    if kind == "VideoConfig" and args.frames:
        fields["frames"] = args.frames
    if kind == "AudioConfig":
        fields["length"] = args.length
    return fields


def item_label(args) -> str:
    """The item's shape as the report states it, e.g. 28×28×1, 1×20×64×64 (C×T×H×W) or 16000×1."""
    shape = net_config(args.net, **item_fields(args)).img_shape
    if len(shape) == 3:
        return f"{args.res}×{args.res}×{args.channels}"
    return "×".join(map(str, shape)) + (" (C×T×H×W)" if len(shape) == 4 else " (C×L)")


def prompts(cfg, batch: int, tokens: int, device) -> dict:
    """Random prompt inputs for a text network (none for others): tokens [B, T, text_dim] with a padding mask of
    random lengths in [T/4, T], and the pooled embedding where the network takes one."""
    if not getattr(cfg, "text_dim", 0):
        return {}
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, tokens // 4), tokens + 1, (batch,), generator=g)
    cond = {"text": torch.randn(batch, tokens, cfg.text_dim, generator=g).to(device),
            "text_mask": (torch.arange(tokens)[None] < lengths[:, None]).to(device)}
    if cfg.text_pooled_dim:
        cond["text_pooled"] = torch.randn(batch, cfg.text_pooled_dim, generator=g).to(device)
    return cond


def empty_prompt_inputs(cfg, tokens: int, device) -> dict:
    """The unconditional input of a text network's CFG, padded as the prompts are: zero tokens, all padding."""
    null = {"text": torch.zeros(1, tokens, cfg.text_dim, device=device),
            "text_mask": torch.zeros(1, tokens, dtype=torch.bool, device=device)}
    if cfg.text_pooled_dim:
        null["text_pooled"] = torch.zeros(1, cfg.text_pooled_dim, device=device)
    return null


def variants(args) -> list[str]:
    """The variants that apply to the network: the CFG teacher's needs prompts or classes."""
    return [name for name, spec in VARIANTS.items() if not spec.get("cfg") or cond_is_text(args.net) or args.classes]


def cond_is_text(net: str) -> bool:
    return bool(net_config(net).__dict__.get("text_dim", 0))


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(names, args) -> dict[str, float]:
    """Peak RSS of each variant's steps, in MB, each in a fresh process (all run at once: each process's peak is
    its own)."""
    procs = {}
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--batch", str(args.batch), "--res", str(args.res),
               "--channels", str(args.channels), "--device", args.device, "--net", args.net,
               "--precision", args.precision, "--text-tokens", str(args.text_tokens), "--frames", str(args.frames),
               "--length", str(args.length), "--classes", str(args.classes)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks = {}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"peak-memory worker for {name!r} failed (exit {proc.returncode})")
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    return peaks


def worker(args) -> None:
    """A fresh process's peak RSS over two steps of one variant (after a first step's allocations)."""
    step = make_step(args.worker, args, torch.device(args.device))
    for _ in range(3):
        step()
    print(json.dumps({"peak_mb": _peak_rss_mb()}))


def cuda_peaks(steps: dict, device) -> dict[str, float]:
    """Each variant's max_memory_allocated above what is allocated before its steps (the shared network, its
    teacher and Adam's state), over two steps after a first one, in this process, one variant at a time."""
    peaks = {}
    for name, step in steps.items():
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        torch.cuda.synchronize(device)
        peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--res", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--net", default="tiny", choices=list(NET_PRESETS), help="network preset")
    ap.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype (fp32: none)")
    ap.add_argument("--text-tokens", type=int, default=16, help="text networks: prompt tokens (T)")
    ap.add_argument("--classes", type=int, default=0, help="class-conditional: label_dim N, random labels")
    ap.add_argument("--frames", type=int, default=0, help="video networks: frames per clip (0: the preset's)")
    ap.add_argument("--length", type=int, default=16000, help="audio networks: samples per clip")
    ap.add_argument("--name", default=None, help="result file stem (default: step_cost[-<net>][-<device>])")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    device = torch.device(args.device)
    bench = make_bench(args, device)
    steps = {name: make_step(name, args, device, bench) for name in variants(args)}
    rows = time_interleaved(steps, device, args.repeats)
    base = rows["diffusion"]["median_ms"]
    peaks = peak_memory(rows, args) if device.type == "cpu" else cuda_peaks(steps, device)
    for name, r in rows.items():
        r["ratio_to_diffusion"] = r["median_ms"] / base
        r["img_per_s"] = args.batch / (r["median_ms"] / 1000)
        r["peak_memory_mb"] = peaks[name]
    memory_kind = "peak RSS of the process" if device.type == "cpu" else "max_memory_allocated above the model"
    payload = {"batch": args.batch, "resolution": args.res, "channels": args.channels, "item": item_label(args),
               "device": str(device),
               "net": args.net, "precision": args.precision, "memory": memory_kind, "timings": rows,
               **({"text_tokens": args.text_tokens} if cond_is_text(args.net) else {}),
               **({"classes": args.classes} if args.classes else {})}
    classes = f", {args.classes} classes" if args.classes else ""
    report = Report(f"Training-step cost: diffusion vs sCT vs sCD (`{args.net}`{classes}, {item_label(args)}, batch "
                    f"{args.batch}, {args.precision}, {device})")
    report.table(["step", "median ms", "img/s", "× diffusion step", f"peak memory (MB, {memory_kind})"],
                 [[name, f"{r['median_ms']:.0f}", f"{r['img_per_s']:.1f}", f"{r['ratio_to_diffusion']:.2f}",
                   f"{r['peak_memory_mb']:.0f}"] for name, r in rows.items()])
    report.markdown_text(NOTES)
    name = args.name or "-".join(["step_cost", *([args.net.replace("/", "")] if args.net != "tiny" else []),
                                  *([device.type] if device.type != "cpu" else [])])
    print(report.to_markdown())
    json_path, md_path = write_results(name, payload, report)
    print(f"wrote {json_path} and {md_path} ({machine()['cpu']})")


NOTES = """## Notes

- An sCT step needs F (with its graph), JF = cos t·sin t·dF/dt (one forward-mode pass) and a backward. With the
  separate tangent pass that is a JVP pass + a forward + a backward; the **fused pass** computes F and JF in one
  pass (`jvp_tangent(..., primal_grad=True)`): dual inputs while autograd records the primal, so F keeps its
  graph and JF comes out of the same evaluation. The limit is about 1.33× a diffusion step (forward + tangent at
  the cost of one forward + backward); sCD adds one teacher forward on top, and a guided teacher (classifier-free
  guidance, §5.2) two: its conditional and unconditional evaluations, which scm stacks into one call of twice the
  batch where the inputs stack (prompts, and class labels with `NO_CLASS` rows; `loss.cfg_one_call`, default
  true). Same FLOPs, fewer launches and weight reads: it pays most at small batches.
- What made the fused pass cheap: every custom JVP rule (`scm.nets.functional`, `scm.nets.attention`) computes
  the tangent from *detached* saved tensors, and SiLU and the ADN affine have such rules too. Without that, the
  tangent computations were themselves recorded for a backward that never comes (a graph per tangent op): in
  development measurements the fused sCT step then cost 2.2× a diffusion step, slower than the separate passes.
- Memory: after the forward the fused pass holds exactly what the separate passes hold (the activations saved for
  backward; measured with mallinfo2: 572 MB each at batch 64), but while a block runs its intermediates exist
  twice (primal and tangent), so the *peak* is higher (851 vs 572 MB live; the process peak RSS above shows it
  too). When memory, not time, is the limit, set `loss.fused_pass=false`.
- The custom rules also skip the weight-tangent convolution of PyTorch's conv2d JVP formula and Python
  decompositions of scalar ops (see jvp_cost.md); the naive row swaps them for PyTorch's generic formulas.
- `scm train` uses the fused pass by default (`loss.fused_pass`), except under FSDP2, whose hooks have no
  forward-mode AD rule, and with activation checkpointing; the separate pass replays the RNG so both passes draw
  the same dropout masks.
- **Checkpointed blocks** (`net.checkpointing=true`): the separate no-grad tangent pass (stores nothing), then a
  forward of F that keeps only each block's input and recomputes the block in the backward pass: one more forward
  of the student per step, for activations of one block at a time instead of all blocks.
- **sCD + VSD** (`loss.vsd_weight`, §6): the sCD step plus the student's one-step samples (a forward and its
  backward), the teacher's CFG and the critic's evaluation at their noised copies (no grad), and the critic's own
  diffusion loss (a forward and a backward) and Adam update; the critic is a second copy of the network's weights
  and optimizer state, hence the memory.
"""


if __name__ == "__main__":
    main()
