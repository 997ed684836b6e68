"""Export a consistency run (sCT or sCD) as a diffusers pipeline folder: `scm export RUN OUT --format diffusers`.

    OUT/model_index.json                    SCMPipeline: components, t_max, t_mid (the run's times), guidance
                                            default, latent normalisation, where the weights came from
    OUT/model/config.json                   SCMModel: the scm network's config (net_preset + fields) and σ_d
    OUT/model/diffusion_pytorch_model.safetensors
    OUT/scheduler/scheduler_config.json     SCMScheduler: prediction_type "trigflow", sigma_data = σ_d
    OUT/lora/pytorch_lora_weights.safetensors   a LoRA student: its adapters in diffusers' LoRA format, for
                                            `pipe.load_lora_weights` on the teacher's own pipeline (+ scm_lora.json)
    OUT/vae/…                               a run on latents: its AutoencoderKL (safetensors)
    OUT/text_encoder/…                      a text run with a transformers text encoder: a copy of its folder
                                            (safetensors weights, config and tokenizer files), checked against the
                                            run's recorded weights digest; with a diffusers pipeline's encoders
                                            (`scm data encode --pipeline`): its text components, tokenizers,
                                            model_index.json and network config, checked likewise

Loaded with `scm.diffusers.SCMPipeline.from_pretrained(OUT)`, it samples as `scm sample` does (same times, same
noise for the same seed, same decoding; see `scm.diffusers.pipeline`). The EMA weights are exported (σ_rel
`ema_std`, default the run's first), as `scm sample` uses them. Only safetensors and JSON are written (never a
pickle); the folder is built next to OUT and renamed into place (`scm.files.atomic_folder`), so OUT appears
complete or not at all.

A text run's pipeline records its `scm.text.TextConfig` (model_index.json: `text`) and takes prompts as `scm
sample` does; its transformers text encoder's record names the copy (path "text_encoder"), which the pipeline
reads wherever it is loaded from. An encoder folder with pickled weights only (.bin, .pt …) is refused.

A video or audio run's pipeline records the data's modality and rate (model_index.json: `media`, as RUN/media.json)
and returns clips: frames at that frame rate, or audio at that sample rate (`scm.diffusers.pipeline`).

A diffusion run (a teacher) is refused: it samples by integrating the PF-ODE (eq. 3), not with consistency
steps, which is all `SCMScheduler` does.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

from scm.errors import ConfigError, MissingDependency, RunError
from scm.files import atomic_folder

__all__ = ["FORMATS", "PICKLE_SUFFIXES", "TEXT_ENCODER", "encoder_files", "export_diffusers"]

FORMATS = ("diffusers",)
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")
TEXT_ENCODER = "text_encoder"  # the pipeline's component (and folder) holding a transformers text encoder
UNSAFE_SUFFIXES = (*PICKLE_SUFFIXES, ".h5", ".msgpack")  # never copied with a text encoder


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


def export_diffusers(run: str | Path, out: str | Path, *, ema_std: float | None = None, merge_lora: bool = False,
                     device="cpu") -> Path:
    """Write the run's newest checkpoint (its EMA with σ_rel `ema_std`, default the first) as an `SCMPipeline`
    folder `out`, which must not exist; returns its path. A LoRA student's pipeline holds its base and adapters,
    and OUT/lora/ its adapters alone in diffusers' LoRA format (`write_adapters`); with `merge_lora` the adapters
    are added into the base weights instead (a plain network, no OUT/lora/). Errors: `CheckpointError` (not a run,
    no checkpoint, no such EMA), `RunError` (`out` exists; a diffusion run; a text encoder that cannot be copied;
    merge_lora on a run without adapters), `MissingDependency` (no diffusers), `DataError` (a run on latents whose
    VAE cannot be loaded)."""
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
    lora = cfg.lora.rank > 0
    if merge_lora and not lora:
        raise RunError(f"{run}: the run has no LoRA adapters to merge (lora.rank is 0)", key="run")
    net_cfg = _merged(loaded.net) if merge_lora else cfg.net
    model = pipeline.SCMModel(net_preset=cfg.net_preset, net_config=to_dict(net_cfg), sigma_d=sigma_d)
    model.net.load_state_dict(loaded.net.state_dict(), strict=True)
    scheduler = pipeline.SCMScheduler(prediction_type="trigflow", sigma_data=sigma_d)
    extra = {"t_mid": float(cfg.t_mid),  # the run's 2-step time (the paper's 1.1 unless the run set another)
             "guidance_default": Conditioning.of_run(cfg).default_guidance,  # a guided student's (generate's)
             "source": {"preset": cfg.preset, "method": cfg.method, "net_preset": cfg.net_preset,
                        "step": loaded.step, "ema_std": loaded.ema_std}}
    extra["text"], text_encoder = _text_parts(pipeline, cfg, run)
    if loaded.modality != "image":  # video or audio: what the samples are, and their frame or sample rate
        extra["media"] = dict(loaded.media)
    vae = None
    if loaded.latent is not None:
        from scm.data.latents import decoder

        info = loaded.latent
        vae = decoder(info)
        extra.update(latent_mean=[float(v) for v in info["mean"]], latent_std=[float(v) for v in info["std"]],
                     latent_sigma_d=float(info["sigma_d"]))
    pipe = pipeline.SCMPipeline(model=model, scheduler=scheduler, vae=vae, text_encoder=text_encoder, **extra)

    try:
        with atomic_folder(out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            pickled = [p for p in tmp.rglob("*") if p.suffix in PICKLE_SUFFIXES]
            if pickled:  # diffusers chose a pickle format: refuse rather than write one
                raise RunError(f"{out}: the export would contain pickle files ({', '.join(p.name for p in pickled)})")
            if text_encoder is not None:  # the copy is the encoder the run was trained with (its weights digest)
                _check_copy(cfg.text.encoder, tmp / TEXT_ENCODER, run)
            if lora and not merge_lora:
                write_adapters(loaded.net, tmp / LORA_FOLDER, {**extra["source"], "t_mid": extra["t_mid"],
                                                               "sigma_d": sigma_d, "guidance_default":
                                                               extra["guidance_default"]})
    except FileExistsError:
        raise RunError(f"{out}: already exists (the export writes a new folder)", key="out") from None
    except OSError as e:  # the disk filled, or the folder was made read-only meanwhile: nothing is left behind
        raise RunError(f"{out}: cannot write the export ({e.strerror or e})", key="out") from None
    return out


def _merged(net):
    """A LoRA student's network config once its adapters are merged into its base (`net` is merged in place)."""
    from scm.diffusers.lora import merge_adapters
    from scm.lora_config import LoRAConfig

    merge_adapters(net.model)
    return dataclasses.replace(net.cfg, lora=LoRAConfig(), lora_base="")


# the pipeline class whose `save_lora_weights` / `load_lora_weights` a student class's adapters go with
LORA_PIPELINES = {"SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline",
                  "SanaTransformer2DModel": "SanaPipeline", "UNet2DConditionModel": "StableDiffusionXLPipeline"}
LORA_FOLDER = "lora"


def write_adapters(net, folder: Path, record: dict) -> None:
    """A LoRA student's adapters as diffusers' LoRA file `folder`/pytorch_lora_weights.safetensors (the pipeline
    class's own `save_lora_weights`, with the adapters' configuration as its metadata), which
    `pipe.load_lora_weights(folder)` loads into the teacher's pipeline (SD3, Flux, Sana, SD/SDXL); and
    `folder`/scm_lora.json: the base, the times and σ_d to sample with, and whether the student has a guidance
    input (the adapters alone do not carry it, nor the heads: use the SCMPipeline for those)."""
    import json

    import diffusers
    from safetensors.torch import save_file

    from scm.diffusers.lora import adapter_state, lora_prefix
    from scm.files import atomic_write

    cfg = net.cfg
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state(net.model).items()}
    metadata = {"r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha or cfg.lora.rank, "target_modules": net.adapted}
    folder.mkdir(parents=True)
    loader, component = LORA_PIPELINES.get(cfg.model_class), lora_prefix(cfg.model_class)
    if loader is not None:
        getattr(diffusers, loader).save_lora_weights(folder, **{f"{component}_lora_layers": state,
                                                                f"{component}_lora_adapter_metadata": metadata})
    else:  # no diffusers pipeline loads LoRAs into this class: the same layout, for peft or by hand
        save_file({f"{component}.{k}": v for k, v in state.items()}, str(folder / "pytorch_lora_weights.safetensors"))
    guided = net.guidance_linear is not None or bool(net.base_new_keys)  # an input the teacher's pipeline lacks
    info = {"base": cfg.lora_base, "model_class": cfg.model_class, "pipeline_class": loader,
            "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha or cfg.lora.rank, "targets": net.adapted},
            "guidance_input": guided, **record}
    atomic_write(folder / "scm_lora.json", json.dumps(info, indent=2) + "\n")


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


def _text_parts(pipeline, cfg, run) -> tuple[dict | None, object]:
    """(the pipeline's `text` record, its `text_encoder` component or None) of a run: None, None without prompts; a
    transformers encoder is recorded as the pipeline's own copy (path TEXT_ENCODER)."""
    from scm.conditioning import Conditioning

    text = Conditioning.of_run(cfg).text
    if text is None:
        return None, None
    record = dataclasses.asdict(text)
    kind = text.encoder.get("kind")
    if kind not in ("transformers", "pipeline"):
        return record, None
    folder = Path(text.encoder["path"]).expanduser()
    record["encoder"] = {**text.encoder, "path": TEXT_ENCODER}
    if kind == "pipeline":  # a diffusers pipeline's own encoders: its text components, tokenizers and settings
        from scm.diffusers.pipeline_text import pipeline_files

        try:
            files = pipeline_files(folder)
        except ConfigError as e:
            raise RunError(f"{run}: cannot export its text encoders ({e})", key="run") from None
        return record, pipeline.SCMTextEncoder.of_folder(folder, files)
    return record, pipeline.SCMTextEncoder.of_folder(folder, encoder_files(folder, run))


def encoder_files(folder: Path, run="the run") -> list[str]:
    """The files a copy of the transformers text encoder at `folder` needs, relative to it: those beside its
    config.json and beside its tokenizer's files (the folder itself, or a diffusers pipeline's text_encoder/ and
    tokenizer/: `scm.text_transformers`), pickles and hidden files left out; RunError when the folder is no
    encoder or holds no safetensors weights."""
    from scm.text_transformers import encoder_folders

    try:
        parts = dict.fromkeys(encoder_folders(folder))  # (the model's folder, the tokenizer's), once each
    except ConfigError as e:
        raise RunError(f"{run}: cannot export its text encoder ({e})", key="run") from None
    files = sorted(str(p.relative_to(folder)) for part in parts for p in part.iterdir()
                   if p.is_file() and not p.name.startswith(".") and not p.name.endswith(UNSAFE_SUFFIXES))
    if not any(f.endswith(".safetensors") for f in files):
        raise RunError(f"{run}: cannot export its text encoder {folder}: its weights are not safetensors", key="run")
    return files


def _check_copy(spec: dict, copy: Path, run) -> None:
    """RunError unless the encoder copied to `copy` loads as the one `spec` records (its weights digest)."""
    from scm.text import load_text_encoder

    try:
        load_text_encoder({**spec, "path": str(copy)})
    except (ConfigError, OSError, ValueError) as e:
        raise RunError(f"{run}: its text encoder {spec.get('path')} is not the one it was trained with ({e})",
                       key="run") from None
