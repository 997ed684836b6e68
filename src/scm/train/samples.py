"""Sample grids at fixed seeds during training: 1- and 2-step for consistency runs, Heun for diffusion."""

from __future__ import annotations

from pathlib import Path

import torch

from scm.config import TrainConfig
from scm.images import grid, save_png
from scm.nets.unet import UNet
from scm.sampling import consistency_sample, consistency_times, ode_sample, ode_times

__all__ = ["conditioning", "sample_grids"]


def conditioning(cfg: TrainConfig, count: int, device) -> dict:
    """Labels cycling through the classes (conditional runs) and the student's guidance input (sCD + CFG)."""
    cond = {}
    if cfg.net.label_dim:
        cond["labels"] = torch.arange(count, device=device) % cfg.net.label_dim
    if cfg.net.guidance_embed and cfg.loss.guidance:
        cond["guidance"] = float(cfg.loss.guidance[0])
    return cond


@torch.no_grad()
def sample_grids(cfg: TrainConfig, weights: dict, device, out_dir: Path, kimg: float) -> list[Path]:
    if cfg.channels not in (1, 3):
        return []  # latents etc.: nothing to look at without a decoder
    net = UNet(cfg.net).to(device).eval()
    net.load_state_dict(weights)
    sd, n = cfg.loss.sigma_d, cfg.sample_count
    gen = torch.Generator(device).manual_seed(0)
    noise = sd * torch.randn(n, cfg.channels, cfg.resolution, cfg.resolution, generator=gen, device=device)
    cond = conditioning(cfg, n, device)
    tag = f"{kimg:09.1f}kimg"
    paths = []
    if cfg.method == "diffusion":
        steps = cfg.sample_ode_steps
        x = ode_sample(net, noise, ode_times(steps, sigma_d=sd), sd, solver="heun", **cond)
        paths.append(save_png(grid(x), out_dir / f"{tag}-heun-nfe{2 * steps - 1}.png"))
    else:
        for steps in (1, 2):
            g = torch.Generator(device).manual_seed(1)
            x = consistency_sample(net, noise, consistency_times(steps, sigma_d=sd), sd, generator=g, **cond)
            paths.append(save_png(grid(x), out_dir / f"{tag}-{steps}step.png"))
    return paths
