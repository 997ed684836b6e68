"""Sample grids at fixed seeds during training: 1- and 2-step for consistency runs, Heun for diffusion runs.

The same generator as `scm sample` (`scm.generate`): sample i of every grid comes from seed (0, i), so grids
of successive checkpoints show the same noise. A run on latents decodes its grids through the data's VAE
(`scm.generate`, which decodes); when the VAE cannot be loaded the grids are skipped with a warning, never the
training.

What a grid is follows the run's modality (`media`, what RUN/media.json records): images a PNG grid; video one
animated GIF of the clips side by side at the data's frame rate (`scm.media.save_gif_grid`); audio a PNG of the
clips' spectrograms, one row per clip (`scm.media.save_spectrogram_grid`), and the first `AUDIO_CLIPS` clips as
WAV files at the data's sample rate, to listen to."""

from __future__ import annotations

from pathlib import Path

import torch

from scm.config import TrainConfig
from scm.errors import DataError, MissingDependency
from scm.generate import Sampler, generate
from scm.images import grid, report_scale, save_png
from scm.media import save_gif_grid, save_spectrogram_grid, save_wav
from scm.runs import network_run

__all__ = ["AUDIO_CLIPS", "sample_grids"]

AUDIO_CLIPS = 4  # WAV files written beside each spectrogram grid of an audio run


@torch.no_grad()
def sample_grids(cfg: TrainConfig, weights: dict, device, out_dir: Path, kimg: float, *, latent: dict | None = None,
                 warn=print, prompts: list[str] | None = None, media: dict | None = None) -> list[Path]:
    """Grids of the EMA `weights` into out_dir; `latent`: the data's latent information (decode through its VAE);
    `prompts`: a text run's (image i takes prompt i mod their number); `media`: the data's modality and timing
    (video: fps; audio: sample_rate)."""
    if latent is None and cfg.channels not in (1, 3) and len(cfg.shape) != 2:
        return []  # other data without a decoder: nothing to look at
    run = network_run(cfg, weights, source=out_dir, ema_std=cfg.ema.stds[0], step=round(kimg * 1000 / cfg.batch),
                      latent=latent, device=device, media=media)
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
        paths += _write(x, run.media, out_dir / f"{kimg:09.1f}kimg-{name}")
    return paths


def _write(x: torch.Tensor, media: dict, stem: Path) -> list[Path]:
    """The files of one grid: stem.png (images; audio: spectrograms, and stem-<i>.wav), stem.gif (video)."""
    if media["modality"] == "video":
        return [save_gif_grid(x, stem.with_name(stem.name + ".gif"), fps=media["fps"], scale=report_scale(x.shape))]
    if media["modality"] == "audio":
        wavs = [save_wav(clip, stem.with_name(f"{stem.name}-{i}.wav"), media["sample_rate"])
                for i, clip in enumerate(x[:AUDIO_CLIPS])]
        return [save_spectrogram_grid(x, stem.with_name(stem.name + ".png")), *wavs]
    return [save_png(grid(x, scale=report_scale(x.shape)), stem.with_name(stem.name + ".png"))]
