"""Which network for audio: the patch transformer on the waveform (`audio-tiny`) against a 1-D convolutional U-Net.

    python benchmarks/audio_network.py [--steps 300] [--batch 8] [--threads 2]

Data: a synthetic set of tones, 1 s at 16 kHz ([N, 1, 16000]): a sine of random pitch (110–880 Hz, log-uniform),
phase and amplitude (0.3–0.9) under an attack/decay envelope, plus its octave at a random level. Both networks
train with `scm.objectives.DiffusionLoss` (the teacher's loss, uniform weighting so that losses compare) for the
same number of Adam steps at the same batch; each reports its parameter count, the median wall time of a training
step (forward + backward) and of the tangent pass (forward + JVP in x and t, under no_grad), and the held-out
diffusion loss (64 clips, fixed noise and times) at initialization and every 50 steps. The U-Net is built here
only (plain PyTorch layers, whose forward-AD rules PyTorch provides): it is the alternative measured, not shipped.
Writes benchmarks/results/audio_network.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from common import write_results
from torch import nn

from scm.app.report import Report
from scm.nets import build_net, net_config
from scm.nets.layers import PositionalEmbedding
from scm.objectives import DiffusionLoss

RATE, LENGTH = 16_000, 16_000


def tones(n: int, seed: int) -> torch.Tensor:
    """n clips [n, 1, L] in [-1, 1]: a sine and its octave under an attack/decay envelope (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    time_s = torch.arange(LENGTH) / RATE
    pitch = 110 * 8 ** torch.rand(n, 1, generator=g)
    phase, amp = 2 * math.pi * torch.rand(n, 1, generator=g), 0.3 + 0.6 * torch.rand(n, 1, generator=g)
    octave = 0.5 * torch.rand(n, 1, generator=g)
    attack, decay = 0.01 + 0.1 * torch.rand(n, 1, generator=g), 1 + 4 * torch.rand(n, 1, generator=g)
    envelope = (1 - torch.exp(-time_s / attack)) * torch.exp(-decay * time_s)
    wave = torch.sin(2 * math.pi * pitch * time_s + phase) + octave * torch.sin(4 * math.pi * pitch * time_s + phase)
    return (amp * envelope * wave / (1 + octave)).clamp(-1, 1)[:, None]


class ResBlock1d(nn.Module):
    """GroupNorm, scale/shift from the time embedding, SiLU, conv; GroupNorm, SiLU, conv; plus the skip."""

    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv1d(c_in, c_out, 5, padding=2)
        self.mod = nn.Linear(emb, 2 * c_in)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv1d(c_out, c_out, 5, padding=2)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x, emb):
        scale, shift = self.mod(emb)[:, :, None].chunk(2, dim=1)
        h = self.conv1(F.silu(self.norm1(x) * (1 + scale) + shift))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet1d(nn.Module):
    """A 1-D U-Net on the waveform: levels of `channels` with ×`factor` strided down- and upsampling (16000 →
    4000 → 1000 → 250 samples), one residual block a level each way, skip connections; F = 0 at initialization."""

    def __init__(self, channels=(32, 64, 96, 128), factor: int = 4, emb: int = 128):
        super().__init__()
        self.time_embed, self.time_mlp = PositionalEmbedding(emb), nn.Sequential(nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Conv1d(1, channels[0], 7, padding=3)
        self.down = nn.ModuleList(ResBlock1d(a, b, emb) for a, b in itertools.pairwise(channels))
        self.pool = nn.ModuleList(nn.Conv1d(c, c, factor, stride=factor) for c in channels[1:])
        self.mid = ResBlock1d(channels[-1], channels[-1], emb)
        self.unpool = nn.ModuleList(nn.ConvTranspose1d(c, c, factor, stride=factor) for c in channels[1:])
        self.up = nn.ModuleList(ResBlock1d(2 * b, a, emb) for a, b in itertools.pairwise(channels))
        self.out = nn.Conv1d(channels[0], 1, 7, padding=3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t):
        emb = self.time_mlp(self.time_embed(t))
        h, skips = self.inp(x), []
        for block, pool in zip(self.down, self.pool, strict=True):
            h = block(h, emb)
            skips.append(h)
            h = pool(h)
        h = self.mid(h, emb)
        for block, unpool in zip(reversed(self.up), reversed(self.unpool), strict=True):
            h = block(torch.cat([unpool(h), skips.pop()], dim=1), emb)
        return self.out(h)


def held_out_loss(net, x0: torch.Tensor, loss: DiffusionLoss) -> float:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return float(loss(net, x0, generator=g)[0])


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def run(name: str, net: nn.Module, train: torch.Tensor, test: torch.Tensor, args) -> dict:
    """Train `net` for args.steps Adam steps on `train` with the diffusion loss; times and held-out losses."""
    loss = DiffusionLoss(adaptive_weight=False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(0)
    x, t = train[: args.batch], torch.rand(args.batch) * 1.5
    dx, dt = torch.randn(x.shape), torch.ones(args.batch)
    jvp_ms = median_ms(torch.no_grad()(lambda: torch.func.jvp(lambda u, s: net(u, s), (x, t), (dx, dt))))
    step_ms = median_ms(lambda: loss(net, x)[0].backward())
    curve = {0: held_out_loss(net, test, loss)}
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(0, len(train), (args.batch,), generator=g)]
        opt.zero_grad(set_to_none=True)
        loss(net, batch, generator=g)[0].backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            curve[step] = held_out_loss(net, test, loss)
            print(f"{name} step {step}: held-out loss {curve[step]:.4f}", flush=True)
    params = sum(p.numel() for p in net.parameters())
    return {"parameters": params, "train_step_ms": step_ms, "jvp_pass_ms": jvp_ms, "held_out_loss": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = tones(512, seed=0), tones(64, seed=1)
    torch.manual_seed(0)
    nets = {"patch transformer (audio-tiny)": build_net(net_config("audio-tiny", length=LENGTH, img_channels=1), 0.5),
            "1-D conv U-Net": UNet1d()}
    results = {name: run(name, net, train, test, args) for name, net in nets.items()}
    report = Report(f"Audio network: patch transformer against 1-D U-Net, {args.steps} diffusion steps at batch "
                    f"{args.batch} on synthetic tones (1 s, 16 kHz), {args.threads} CPU threads")
    steps = sorted(next(iter(results.values()))["held_out_loss"])
    report.table(["network", "parameters", "train step ms", "tangent pass ms",
                  *(f"held-out loss @ {s}" for s in steps)],
                 [[name, f"{r['parameters'] / 1e6:.2f}M", f"{r['train_step_ms']:.0f}", f"{r['jvp_pass_ms']:.0f}",
                   *(f"{r['held_out_loss'][s]:.4f}" for s in steps)] for name, r in results.items()])
    report.text("Loss: `DiffusionLoss` with uniform weighting, mean of ‖F − v/σ_d‖² over 64 held-out clips at fixed "
                f"noise and times (a fresh network's F = 0 gives the first column). Adam, lr {args.lr}. Train step: "
                "forward + backward of the loss; tangent pass: `torch.func.jvp` in (x, t) under no_grad; medians of 5.")
    write_results("audio_network", {"args": vars(args), "results": results}, report)
    print(report.to_markdown())


if __name__ == "__main__":
    main()
