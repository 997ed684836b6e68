"""Resolve, then build: `resolve(cfg, data)` settles everything a run's configuration depends on, and the resolved
configuration is what the run directory's config.json records; `scm.train.build.build` then only constructs.

What is settled, in order:
- the data: its item shape is the preset's (`resolution`, `channels`), latents were normalised to the run's σ_d;
- the teacher (sCD): its kind and network (`scm.teachers.open_teacher`, configuration files only), its input
  shape, the space of its data; a class-conditional teacher makes the run class-conditional;
- the student's network and where its weights come from (`net_preset`, `net`, `init`): the init run's network
  (`init`, with this run's training-time settings), else for sCD the teacher's own (a run of the same architecture:
  `init` becomes the teacher, paper App. G.2; a diffusers teacher: its network as a `scm.diffusers` student), else
  the preset's network, fresh; a student of a class-conditional run is class-conditional too;
- the prompts of a text network (`text`): the encoder, token count and widths of the data's caption embeddings
  (a student of a text run keeps its run's, which the data must share);
- the conditioning (`conditional`, the network's classes, `text`): what the data must provide
  (`Conditioning.requires`).

Pure: it reads the configuration files of the runs and folders it names, never weights, consumes no random
numbers and returns a new configuration (the given one is not modified).
"""

from __future__ import annotations

import copy
import dataclasses

from scm._checks import describe_shape
from scm.conditioning import Conditioning
from scm.config import TrainConfig
from scm.data.dataset import Dataset
from scm.errors import ConfigError, DataError
from scm.runs import RunDir, read_run_config
from scm.teachers import TeacherSource, open_teacher
from scm.text import TextConfig

__all__ = ["DIFFUSERS_NET_PRESET", "TRAINING_NET_FIELDS", "architecture", "check_same_space", "diffusers_student",
           "resolve"]

# Fields a student may change relative to the run it is initialized from (training-time behaviour only).
TRAINING_NET_FIELDS = ("dropout", "dropout_max_res", "label_dropout", "guidance_embed", "checkpointing")
DIFFUSERS_NET_PRESET = "diffusers"
SPACE_FIELDS = ("vae", "mean", "std", "sigma_d")  # what makes two latent spaces the same one


def resolve(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    """The configuration `cfg` trains with on `data` (module docstring), validated."""
    cfg = copy.deepcopy(cfg)
    teacher = open_teacher(cfg.teacher) if cfg.method == "scd" else None
    if teacher is not None and teacher.kind == "diffusers" and cfg.init is None:
        _shape_of_data(cfg, teacher, data)
    _check_data(cfg, data)
    if teacher is not None:
        _check_teacher(cfg, teacher, data)
    if cfg.init is None and teacher is not None and teacher.kind == "run" \
            and type(teacher.run_cfg.net) is type(cfg.net):
        cfg.init = cfg.teacher  # sCD starts from its teacher (paper App. G.2) when it has the student's architecture
    if cfg.init is not None:
        _student_of_run(cfg, data)
    elif teacher is not None and teacher.kind == "diffusers" and (student := diffusers_student(cfg, teacher, data)[0]):
        cfg.net, cfg.net_preset = student, DIFFUSERS_NET_PRESET
        _prompts_of_teacher(cfg, data)
    else:
        cfg.net = dataclasses.replace(cfg.net, label_dim=data.num_classes if cfg.conditional else 0)
        _text_of_data(cfg, data)
    if cfg.lora.rank and cfg.net_preset != DIFFUSERS_NET_PRESET:
        raise ConfigError(f"lora.rank={cfg.lora.rank}: adapters train on the teacher's own network, but scm cannot "
                          f"train {cfg.teacher} as a student ({diffusers_student(cfg, teacher, data)[1]})",
                          key="lora.rank")
    _check_conditioning(cfg, data)
    cfg.validate()
    return cfg


def architecture(net_cfg) -> str:
    """"UNet", "DiT", "DiffusersNet" …: the network a config builds."""
    return type(net_cfg).__name__.removesuffix("Config")


def _shape_of_data(cfg: TrainConfig, teacher: TeacherSource, data: Dataset) -> None:
    """A diffusers teacher whose network becomes the student (`scm.diffusers.families`) takes the data's shape: the
    preset's resolution and channels give way to it (the preset's own network is not used)."""
    from scm.diffusers.net_config import SUPPORTED_MODELS

    if teacher.folder.model_class not in SUPPORTED_MODELS or len(data.shape) != 3:
        return
    channels, h, w = data.shape
    cfg.channels, cfg.resolution = channels, (h if h == w else (h, w))
    cfg.net = dataclasses.replace(cfg.net, img_resolution=cfg.resolution, img_channels=channels)


def _check_data(cfg: TrainConfig, data: Dataset) -> None:
    if data.shape != cfg.shape:
        raise DataError(f"{data.source}: {describe_shape(data.shape)} ({data.channels} channel(s)), but preset "
                        f"{cfg.preset or '(none)'} expects {describe_shape(cfg.shape)} (set resolution and channels "
                        "if you mean it)")
    # latents are normalised to their σ_d when encoded (App. G.1), except at the VAE's own scale (diffusers teachers)
    latent = data.latent
    if latent and latent.get("normalization") != "vae" and float(latent["sigma_d"]) != cfg.loss.sigma_d:
        raise DataError(f"{data.source}: the latents were normalised to σ_d = {latent['sigma_d']}, but the run's "
                        f"loss.sigma_d is {cfg.loss.sigma_d}", key="loss.sigma_d")


def _text_of_data(cfg: TrainConfig, data: Dataset) -> None:
    """A fresh text network (its preset has cross-attention) takes the prompts of the data's caption embeddings."""
    if not getattr(cfg.net, "text_dim", 0):
        return
    info = getattr(data, "text", None)
    if info is None:
        raise DataError(f"{data.source}: net_preset {cfg.net_preset} is text-conditioned, but the data set holds no "
                        "prompt embeddings (encode its captions with a text encoder first: scm data encode)",
                        key="data")
    cfg.text = TextConfig.of_data(info, cfg.text.caption_dropout)
    cfg.net = dataclasses.replace(cfg.net, text_dim=cfg.text.width, text_pooled_dim=cfg.text.pooled_width)


def _prompts_of_teacher(cfg: TrainConfig, data: Dataset) -> None:
    """A diffusers student that takes prompts takes the data's caption embeddings, which must have its widths (made
    by its pipeline's own text encoders: `scm data encode` with the pipeline); a pooled embedding the network does
    not take is left unused."""
    if not cfg.net.text_dim:
        return
    info = getattr(data, "text", None)
    if info is None:
        raise DataError(f"{data.source}: the teacher {cfg.teacher} takes prompts, but the data set holds no prompt "
                        "embeddings (encode its captions with the teacher's pipeline: scm data encode)", key="data")
    text = TextConfig.of_data(info, cfg.text.caption_dropout)
    if text.width != cfg.net.text_dim or (cfg.net.text_pooled_dim and text.pooled_width != cfg.net.text_pooled_dim):
        raise DataError(f"{data.source}: its prompt embeddings have widths (tokens {text.width}, pooled "
                        f"{text.pooled_width}), the teacher {cfg.teacher} takes ({cfg.net.text_dim}, "
                        f"{cfg.net.text_pooled_dim}): encode the captions with the teacher's pipeline", key="data")
    cfg.text = text


def _check_conditioning(cfg: TrainConfig, data: Dataset) -> None:
    missing = [k for k in Conditioning.of_run(cfg).requires() if k not in data.conditions]
    if cfg.conditional and "labels" in missing:
        raise DataError(f"{data.source}: conditional=true needs class labels, but the data set has none")
    if missing:
        raise DataError(f"{data.source}: the run's network takes prompts, but the data set lacks {', '.join(missing)}",
                        key="data")


def check_same_space(path: str, run_latent: dict | None, data: Dataset, role: str) -> None:
    """A teacher or init run must have been trained in the data's space: pixels, or latents of the same VAE with
    the same per-channel normalisation (App. G.1); otherwise its F would be of other values."""
    here = data.latent
    if run_latent is None and here is None:
        return
    describe = lambda info: "pixels" if info is None else f"latents of {info.get('vae')}"  # noqa: E731
    if run_latent is None or here is None or any(run_latent.get(k) != here.get(k) for k in SPACE_FIELDS):
        diff = [k for k in SPACE_FIELDS if run_latent and here and run_latent.get(k) != here.get(k)]
        raise ConfigError(f"{role} {path} was trained on {describe(run_latent)}, this run's data are "
                          f"{describe(here)}" + (f" (they differ in {', '.join(diff)})" if diff else ""), key=role)


def _check_teacher(cfg: TrainConfig, teacher: TeacherSource, data: Dataset) -> None:
    """The teacher's input shape and data space are the run's; a class-conditional diffusers teacher makes the run
    class-conditional (and must know the data's classes)."""
    if teacher.kind == "run":
        if teacher.run_cfg.method != "diffusion":
            raise ConfigError(f"teacher {cfg.teacher}: an {teacher.run_cfg.method} run (a consistency model); sCD "
                              "distils a diffusion model, whose network gives the PF-ODE's tangent (paper §5): "
                              "train one with method=diffusion, or start from this run with init", key="teacher")
        check_same_space(cfg.teacher, teacher.latent, data, "teacher")
    if teacher.shape is not None and teacher.shape != cfg.shape:
        raise ConfigError(f"teacher {cfg.teacher}: its network is {describe_shape(teacher.shape)} but this run's data "
                          f"is {describe_shape(cfg.shape)}", key="teacher")
    if teacher.kind == "diffusers":
        if teacher.folder.takes_guidance and getattr(cfg.loss, "guidance", None) is None:
            raise ConfigError(f"teacher {cfg.teacher}: a guidance-distilled model (its network takes the guidance "
                              "scale, as Flux-dev's): distil it with a guidance range (e.g. loss.guidance=1,4)",
                              key="loss.guidance")
        if teacher.classes and not cfg.conditional:
            cfg.conditional = True
            _check_conditioning(cfg, data)
        if cfg.conditional and data.num_classes > teacher.classes:
            raise ConfigError(f"teacher {cfg.teacher}: {teacher.classes or 'no'} classes, but the data has "
                              f"{data.num_classes}", key="teacher")


def _student_of_run(cfg: TrainConfig, data: Dataset) -> None:
    """The network of the run `cfg.init` (its architecture, preset and classes) with this run's training-time
    settings; a student of a class-conditional run is class-conditional too."""
    src = read_run_config(cfg.init)
    check_same_space(cfg.init, RunDir(cfg.init).read_latent(), data, "init")
    if src.shape != cfg.shape:
        raise ConfigError(f"init {cfg.init}: its network is {describe_shape(src.shape)} but this run's data is "
                          f"{describe_shape(cfg.shape)}", key="init")
    if type(src.net) is not type(cfg.net):
        raise ConfigError(f"init {cfg.init}: its network is a {architecture(src.net)} ({src.net_preset}), this run's "
                          f"a {architecture(cfg.net)} ({cfg.net_preset})", key="init")
    if src.net.label_dim and not cfg.conditional:
        cfg.conditional = True
        _check_conditioning(cfg, data)
    if cfg.conditional and src.net.label_dim != data.num_classes:
        raise ConfigError(f"init {cfg.init}: {src.net.label_dim} classes, but the data has {data.num_classes}",
                          key="init")
    if getattr(src.net, "text_dim", 0):
        _same_prompts(cfg.init, src.text, data)
        cfg.text = dataclasses.replace(src.text, caption_dropout=cfg.text.caption_dropout)
    changes = {k: getattr(cfg.net, k) for k in TRAINING_NET_FIELDS if hasattr(cfg.net, k)}
    cfg.net, cfg.net_preset = dataclasses.replace(src.net, **changes), src.net_preset


def _same_prompts(path: str, text: TextConfig, data: Dataset) -> None:
    """The data's caption embeddings were made as those of the text run at `path` (same encoder and shapes)."""
    info = getattr(data, "text", None)
    if info is None:
        raise DataError(f"{data.source}: init {path} is text-conditioned, but the data set holds no prompt "
                        "embeddings (encode its captions with the run's text encoder first: scm data encode)",
                        key="data")
    here = TextConfig.of_data(info, text.caption_dropout)
    differ = [k for k in ("encoder", "max_tokens", "width", "pooled_width") if getattr(here, k) != getattr(text, k)]
    if differ:
        raise ConfigError(f"init {path}: its prompts were encoded otherwise than this data's ({', '.join(differ)} "
                          f"differ: {text.encoder} vs {here.encoder}); encode the data with the run's text encoder",
                          key="init")


def diffusers_student(cfg: TrainConfig, teacher: TeacherSource, data: Dataset):
    """(config, None): the sCD student a diffusers teacher gives (its own network, with TrigFlow in/out, the w_φ head
    and a guidance input: `scm.diffusers.net.student_config`); (None, why) when scm cannot train its network as a
    student."""
    from scm.diffusers.net import student_config

    f = teacher.folder
    try:
        return student_config(f.model_class, f.model_config, f.scheduler_class, f.scheduler_config,
                              data=cfg.teacher_data, label_dim=data.num_classes if cfg.conditional else 0,
                              guidance_embed=getattr(cfg.net, "guidance_embed", False),
                              label_dropout=getattr(cfg.net, "label_dropout", 0.0), shape=data.shape,
                              checkpointing=getattr(cfg.net, "checkpointing", False), lora=cfg.lora,
                              lora_base=cfg.teacher if cfg.lora.rank else ""), None
    except ConfigError as e:
        return None, str(e)
