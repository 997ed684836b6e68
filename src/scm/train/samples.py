"""Sample grids at fixed seeds during training: 1- and 2-step for consistency runs, Heun for diffusion runs.

The same generator as `scm sample` (`scm.generate`): image i of every grid comes from seed (0, i), so grids
of successive checkpoints show the same noise."""

from __future__ import annotations

from pathlib import Path

import torch

from scm.config import TrainConfig
from scm.generate import Sampler, generate
from scm.images import grid, report_scale, save_png
from scm.nets.registry import build_net
from scm.runs import LoadedRun

__all__ = ["sample_grids"]


@torch.no_grad()
def sample_grids(cfg: TrainConfig, weights: dict, device, out_dir: Path, kimg: float) -> list[Path]:
    if cfg.channels not in (1, 3):
        return []  # latents etc.: nothing to look at without a decoder
    net = build_net(cfg.net).to(device).eval()
    net.load_state_dict(weights)
    run = LoadedRun(cfg, net, out_dir, cfg.ema.stds[0], round(kimg * 1000 / cfg.batch))
    if cfg.method == "diffusion":
        samplers = {f"heun-nfe{2 * cfg.sample_ode_steps - 1}": Sampler(nfe=2 * cfg.sample_ode_steps - 1)}
    else:
        samplers = {"1step": Sampler(steps=1), "2step": Sampler(steps=2)}
    paths = []
    for name, sampler in samplers.items():
        x, _ = generate(run, cfg.sample_count, sampler, batch=cfg.sample_count, seed=0, progress=False)
        paths.append(save_png(grid(x, scale=report_scale(cfg.resolution)), out_dir / f"{kimg:09.1f}kimg-{name}.png"))
    return paths
