"""Sample grids at fixed seeds during training: 1- and 2-step for consistency runs, Heun for diffusion runs.

The same generator as `scm sample` (`scm.generate`): image i of every grid comes from seed (0, i), so grids
of successive checkpoints show the same noise. A run on latents decodes its grids through the data's VAE
(`scm.generate`, which decodes); when the VAE cannot be loaded the grids are skipped with a warning, never the
training."""

from __future__ import annotations

from pathlib import Path

import torch

from scm.config import TrainConfig
from scm.errors import DataError, MissingDependency
from scm.generate import Sampler, generate
from scm.images import grid, report_scale, save_png
from scm.runs import network_run

__all__ = ["sample_grids"]


@torch.no_grad()
def sample_grids(cfg: TrainConfig, weights: dict, device, out_dir: Path, kimg: float, *, latent: dict | None = None,
                 warn=print, prompts: list[str] | None = None) -> list[Path]:
    """Grids of the EMA `weights` into out_dir; `latent`: the data's latent information (decode through its VAE);
    `prompts`: a text run's (image i takes prompt i mod their number)."""
    if (latent is None and cfg.channels not in (1, 3)) or len(cfg.shape) != 3:
        return []  # other data without a decoder, video and audio: no image grid to look at
    run = network_run(cfg, weights, source=out_dir, ema_std=cfg.ema.stds[0], step=round(kimg * 1000 / cfg.batch),
                      latent=latent, device=device)
    if cfg.method == "diffusion":
        samplers = {f"heun-nfe{2 * cfg.sample_ode_steps - 1}": Sampler(nfe=2 * cfg.sample_ode_steps - 1)}
    else:
        samplers = {"1step": Sampler(steps=1), "2step": Sampler(steps=2)}
    paths = []
    for name, sampler in samplers.items():
        try:
            x, _ = generate(run, cfg.sample_count, sampler, batch=cfg.sample_count, seed=0, progress=False,
                            prompt=prompts)
        except (DataError, MissingDependency) as e:  # only decoding raises these here
            warn(f"sample grids skipped: cannot decode the latents ({e})")
            return paths
        paths.append(save_png(grid(x, scale=report_scale(x.shape)), out_dir / f"{kimg:09.1f}kimg-{name}.png"))
    return paths
