"""Export a consistency run (sCT or sCD) as a diffusers pipeline folder: `scm export RUN OUT --format diffusers`.

    OUT/model_index.json                    SCMPipeline: components, t_max, t_mid (the run's times), guidance
                                            default, latent normalisation, where the weights came from
    OUT/model/config.json                   SCMModel: the scm network's config (net_preset + fields) and σ_d
    OUT/model/diffusion_pytorch_model.safetensors
    OUT/scheduler/scheduler_config.json     SCMScheduler: prediction_type "trigflow", sigma_data = σ_d
    OUT/vae/…                               a run on latents: its AutoencoderKL (safetensors)

Loaded with `scm.diffusers.SCMPipeline.from_pretrained(OUT)`, it samples as `scm sample` does (same times, same
noise for the same seed, same decoding; see `scm.diffusers.pipeline`). The EMA weights are exported (σ_rel
`ema_std`, default the run's first), as `scm sample` uses them. Only safetensors and JSON are written (never a
pickle); the folder is built next to OUT and renamed into place (`scm.files.atomic_folder`), so OUT appears
complete or not at all.

A diffusion run (a teacher) is refused: it samples by integrating the PF-ODE (eq. 3), not with consistency
steps, which is all `SCMScheduler` does.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from scm.errors import MissingDependency, RunError
from scm.files import atomic_folder

__all__ = ["FORMATS", "PICKLE_SUFFIXES", "export_diffusers"]

FORMATS = ("diffusers",)
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")


def _pipeline_module():
    """scm.diffusers.pipeline (it needs diffusers >= 0.33: MissingDependency otherwise)."""
    try:
        pipeline = importlib.import_module("scm.diffusers.pipeline")
    except MissingDependency:
        raise
    except ImportError as e:  # an older diffusers without SCMScheduler, or a broken installation
        raise MissingDependency(f"exporting to diffusers needs diffusers >= 0.33 ({e}): pip install scm[diffusers]",
                                extra="diffusers") from None
    return pipeline


def export_diffusers(run: str | Path, out: str | Path, *, ema_std: float | None = None, device="cpu") -> Path:
    """Write the run's newest checkpoint (its EMA with σ_rel `ema_std`, default the first) as an `SCMPipeline`
    folder `out`, which must not exist; returns its path. Errors: `CheckpointError` (not a run, no checkpoint, no
    such EMA), `RunError` (`out` exists; a diffusion run), `MissingDependency` (no diffusers),
    `DataError` (a run on latents whose VAE cannot be loaded)."""
    pipeline = _pipeline_module()
    from scm.conditioning import Conditioning
    from scm.config import to_dict
    from scm.runs import load_run

    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        raise RunError(f"{out}: already exists (the export writes a new folder)", key="out")
    _check_creatable(out)
    loaded = load_run(run, ema_std, device=device)
    cfg = loaded.cfg
    if cfg.method == "diffusion":
        raise RunError(f"{run}: a diffusion run (a teacher) samples with the PF-ODE, not with consistency steps; "
                       "export an sCT or sCD run", key="run")
    sigma_d = float(cfg.loss.sigma_d)
    model = pipeline.SCMModel(net_preset=cfg.net_preset, net_config=to_dict(cfg.net), sigma_d=sigma_d)
    model.net.load_state_dict(loaded.net.state_dict(), strict=True)
    scheduler = pipeline.SCMScheduler(prediction_type="trigflow", sigma_data=sigma_d)
    extra = {"t_mid": float(cfg.t_mid),  # the run's 2-step time (the paper's 1.1 unless the run set another)
             "guidance_default": Conditioning.of_run(cfg).default_guidance,  # a guided student's (generate's)
             "source": {"preset": cfg.preset, "method": cfg.method, "net_preset": cfg.net_preset,
                        "step": loaded.step, "ema_std": loaded.ema_std}}
    vae = None
    if loaded.latent is not None:
        from scm.data.latents import decoder

        info = loaded.latent
        vae = decoder(info)
        extra.update(latent_mean=[float(v) for v in info["mean"]], latent_std=[float(v) for v in info["std"]],
                     latent_sigma_d=float(info["sigma_d"]))
    pipe = pipeline.SCMPipeline(model=model, scheduler=scheduler, vae=vae, **extra)

    try:
        with atomic_folder(out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            pickled = [p for p in tmp.rglob("*") if p.suffix in PICKLE_SUFFIXES]
            if pickled:  # diffusers chose a pickle format: refuse rather than write one
                raise RunError(f"{out}: the export would contain pickle files ({', '.join(p.name for p in pickled)})")
    except FileExistsError:
        raise RunError(f"{out}: already exists (the export writes a new folder)", key="out") from None
    except OSError as e:  # the disk filled, or the folder was made read-only meanwhile: nothing is left behind
        raise RunError(f"{out}: cannot write the export ({e.strerror or e})", key="out") from None
    return out


def _check_creatable(out: Path) -> None:
    """RunError (key "out") unless `out`'s parent folder exists or can be made, and is writable: checked before
    anything is loaded."""
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise RunError(f"{out}: cannot create it, {existing} is a file, not a folder", key="out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot create its folder {out.parent} ({e.strerror or e})", key="out") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise RunError(f"{out}: its folder {out.parent} is not writable", key="out")
