"""Full against factorised (space, then time) attention in the video transformer, on the CPU.

    python benchmarks/video_attention.py [--batch 8] [--repeats 5] [--large]

For both layouts of `scm.nets.video.VideoTransformer` at `video-tiny`'s size (1×8×32×32 clips; with --large also
`video-S` on 1×20×64×64; class-conditional with a guidance input, as an sCD student would be): the parameter count,
the forward's wall time, that of the forward + JVP (`torch.func.jvp` in x and t under no_grad: sCM's tangent pass)
and of a forward + backward, timed round-robin so that a noisy machine affects both alike. Zero-initialised
weights are made non-zero first (`common.awake`), so every layer takes part.
Writes benchmarks/results/video_attention.{json,md}.
"""

from __future__ import annotations

import argparse

import torch
from common import awake, time_interleaved, write_results

from scm.app.report import Report
from scm.nets.video import ATTENTION_LAYOUTS, VIDEO_PRESETS, VideoConfig, VideoTransformer


def build(preset: str, layout: str, frames: int, res: int) -> VideoTransformer:
    torch.manual_seed(0)
    cfg = VideoConfig(**{**VIDEO_PRESETS[preset], "frames": frames, "img_resolution": res, "img_channels": 1,
                         "label_dim": 10, "guidance_embed": True, "attention": layout})
    return awake(VideoTransformer(cfg, 0.5)).eval()


def measure(preset: str, frames: int, res: int, batch: int, repeats: int) -> dict:
    """Parameters and median times (forward, forward + JVP, forward + backward) of both layouts at one size."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, frames, res, res, generator=g)
    t, labels = torch.rand(batch, generator=g) * 1.5, torch.randint(0, 10, (batch,), generator=g)
    dx, dt = torch.randn(x.shape, generator=g), torch.ones(batch)
    fns, params, tokens = {}, {}, 0
    for layout in ATTENTION_LAYOUTS:
        net = build(preset, layout, frames, res)
        params[layout], tokens = net.num_parameters(), net.pos_embed.shape[0]
        f = lambda u, s, net=net: net(u, s, labels, guidance=2.0)  # noqa: E731
        fns[f"{layout} forward"] = torch.no_grad()(lambda f=f: f(x, t))
        fns[f"{layout} forward+JVP"] = torch.no_grad()(lambda f=f: torch.func.jvp(f, (x, t), (dx, dt)))
        fns[f"{layout} forward+backward"] = lambda f=f: f(x, t).square().mean().backward()
    times = time_interleaved(fns, torch.device("cpu"), repeats=repeats, warmup=1)
    return {"preset": preset, "frames": frames, "res": res, "batch": batch, "tokens": tokens, "repeats": repeats,
            "parameters": params, "times": {k: v["median_ms"] for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--large", action="store_true", help="also video-S on 1×20×64×64 (batch 1, 2 repeats)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [measure("video-tiny", 8, 32, args.batch, args.repeats)]
    if args.large:
        sizes.append(measure("video-S", 20, 64, 1, 2))
    report = Report(f"Video attention layouts: full against factorised (space, then time), {args.threads} CPU threads")
    rows = []
    for m in sizes:
        for layout in ATTENTION_LAYOUTS:
            fwd, jvp, bwd = (m["times"][f"{layout} {k}"] for k in ("forward", "forward+JVP", "forward+backward"))
            rows.append([f"`{m['preset']}` 1×{m['frames']}×{m['res']}×{m['res']}, batch {m['batch']}, "
                         f"{m['tokens']} tokens", layout, f"{m['parameters'][layout] / 1e6:.3f}M", f"{fwd:.0f}",
                         f"{jvp:.0f}", f"{bwd:.0f}", f"{jvp / fwd:.2f}", f"{jvp + bwd:.0f}"])
    report.table(["size", "attention", "parameters", "forward ms", "forward+JVP ms", "forward+backward ms",
                  "JVP / forward", "sCM step ≈ JVP pass + forward+backward, ms"], rows)
    report.text("Medians of round-robin repeats (the tiny size: "
                f"{args.repeats}; video-S: 2). Zero-initialised weights made non-zero first; class labels and "
                "a guidance input as in an sCD student. The JVP pass is `torch.func.jvp` in (x, t) under no_grad.")
    write_results("video_attention", {"sizes": sizes}, report)
    print(report.to_markdown())


if __name__ == "__main__":
    main()
