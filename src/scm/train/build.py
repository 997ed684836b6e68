"""From a TrainConfig to the objects a run needs: the network (fresh, or initialized from a run's EMA), the
sCD teacher, and the objective (the configured one, handed its teacher)."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

import torch

from scm.config import TrainConfig
from scm.data import ImageData, PreparedData
from scm.errors import ConfigError, DataError
from scm.nets.registry import NetConfig, build_net
from scm.objectives import ConsistencyLoss, DiffusionLoss
from scm.runs import is_run_dir, load_run

__all__ = ["Built", "build", "build_objective", "load_teacher_factory"]

# Fields a student may change relative to the run it is initialized from (training-time behaviour only).
TRAINING_NET_FIELDS = ("dropout", "dropout_max_res", "label_dropout", "guidance_embed")


@dataclass
class Built:
    cfg: TrainConfig
    net: torch.nn.Module
    teacher: object | None
    init_note: str
    teacher_info: dict | None = None  # recorded in RUN/teacher.json (diffusers teachers)


def check_data(cfg: TrainConfig, data: ImageData | PreparedData) -> None:
    if (data.resolution, data.channels) != (cfg.resolution, cfg.channels):
        raise DataError(
            f"{data.source}: {data.resolution}×{data.resolution} with {data.channels} channel(s), but preset "
            f"{cfg.preset or '(none)'} expects {cfg.resolution}×{cfg.resolution} with {cfg.channels} "
            "(set resolution and channels if you mean it)"
        )
    if cfg.conditional and data.labels is None:
        raise DataError(f"{data.source}: conditional=true needs class labels, but the data set has none")
    # latents are normalised to their σ_d when encoded (App. G.1), except at the VAE's own scale (diffusers teachers)
    latent = getattr(data, "latent", None)
    if latent and latent.get("normalization") != "vae" and float(latent["sigma_d"]) != cfg.loss.sigma_d:
        raise DataError(f"{data.source}: the latents were normalised to σ_d = {latent['sigma_d']}, but the run's "
                        f"loss.sigma_d is {cfg.loss.sigma_d}", key="loss.sigma_d")


SPACE_FIELDS = ("vae", "mean", "std", "sigma_d")  # what makes two latent spaces the same one


def check_same_space(path: str, run_latent: dict | None, data, role: str) -> None:
    """A teacher or init run must have been trained in the data's space: pixels, or latents of the same VAE with
    the same per-channel normalisation (App. G.1); otherwise its F would be of other values."""
    here = getattr(data, "latent", None)
    if run_latent is None and here is None:
        return
    describe = lambda info: "pixels" if info is None else f"latents of {info.get('vae')}"  # noqa: E731
    if run_latent is None or here is None or any(run_latent.get(k) != here.get(k) for k in SPACE_FIELDS):
        diff = [k for k in SPACE_FIELDS if run_latent and here and run_latent.get(k) != here.get(k)]
        raise ConfigError(f"{role} {path} was trained on {describe(run_latent)}, this run's data are "
                          f"{describe(here)}" + (f" (they differ in {', '.join(diff)})" if diff else ""), key=role)


def _from_run(cfg: TrainConfig, path: str, std: float | None, role: str, device, data=None):
    """(network, its config, its preset name) of a run's EMA, checked against this run's data shape and space."""
    loaded = load_run(path, std, device=device)
    if data is not None:
        check_same_space(path, loaded.latent, data, role)
    src = loaded.cfg.net
    if (src.img_resolution, src.img_channels) != (cfg.resolution, cfg.channels):
        raise ConfigError(
            f"{role} {path}: its network is {src.img_resolution}×{src.img_resolution}×{src.img_channels} but this "
            f"run's data is {cfg.resolution}×{cfg.resolution}×{cfg.channels}"
        )
    return loaded.net, src, loaded.cfg.net_preset


def _arch(net_cfg: NetConfig) -> str:
    return type(net_cfg).__name__.removesuffix("Config")


def build(cfg: TrainConfig, data: ImageData | PreparedData, device: torch.device) -> Built:
    check_data(cfg, data)
    cfg = dataclasses.replace(cfg)
    teacher, note = None, "fresh initialization"
    teacher_net_cfg = None
    diffusers_teacher = None
    if cfg.method == "scd":
        if cfg.teacher.startswith(DIFFUSERS_PREFIX):
            diffusers_teacher, teacher = _diffusers_teacher(cfg, data, device)
        elif is_run_dir(cfg.teacher):
            teacher, teacher_net_cfg, _ = _from_run(cfg, cfg.teacher, cfg.teacher_ema, "teacher", device, data)
        elif ":" in cfg.teacher:
            teacher = load_teacher_factory(cfg.teacher)
        else:
            raise ConfigError(f"teacher={cfg.teacher!r}: not a run directory (no config.json), 'diffusers:PATH' nor "
                              "'module:function'", key="teacher")
        _check_teacher_shapes(teacher, cfg, data, device)

    init_path = cfg.init
    teacher_info = None if diffusers_teacher is None else _teacher_info(cfg, diffusers_teacher, data)
    if init_path is None and diffusers_teacher is not None:  # a diffusers student, from the teacher's weights
        student, note = _diffusers_student(cfg, diffusers_teacher, data, teacher_info)
        if student is not None:
            cfg.net, cfg.net_preset = student.cfg, DIFFUSERS_NET_PRESET
            return Built(cfg, student.to(device), teacher, note, teacher_info)
    if init_path is None and teacher_net_cfg is not None:  # sCD starts from its teacher (paper App. G.2) …
        if type(teacher_net_cfg) is type(cfg.net):
            init_path = cfg.teacher
        else:  # … when the teacher's architecture is the student's
            note = (f"fresh initialization (the teacher is a {_arch(teacher_net_cfg)}, this preset's "
                    f"network a {_arch(cfg.net)})")
    if init_path is not None:
        init_net, src_cfg, src_preset = _from_run(cfg, init_path, cfg.init_ema, "init", device, data)
        if type(src_cfg) is not type(cfg.net):
            raise ConfigError(f"init {init_path}: its network is a {_arch(src_cfg)} ({src_preset}), "
                              f"this run's a {_arch(cfg.net)} ({cfg.net_preset})", key="init")
        cfg.net_preset = src_preset
        note_cond = ""
        if src_cfg.label_dim and not cfg.conditional:  # a student of a class-conditional run is conditional too
            cfg.conditional = True
            check_data(cfg, data)
            note_cond = ", class-conditional like it"
        if cfg.conditional and src_cfg.label_dim != data.num_classes:
            raise ConfigError(f"init {init_path}: {src_cfg.label_dim} classes, but the data has {data.num_classes}")
        # The init run's network, with this run's training-time settings.
        changes = {k: getattr(cfg.net, k) for k in TRAINING_NET_FIELDS if hasattr(cfg.net, k)}
        net = build_net(dataclasses.replace(src_cfg, **changes))
        missing, unexpected = net.load_state_dict(init_net.state_dict(), strict=False)
        if unexpected or any("guidance" not in k for k in missing):  # only a new guidance input may be fresh
            raise ConfigError(
                f"init {init_path}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        note = f"initialized from {init_path} (EMA σ_rel={cfg.init_ema or 'first'}){note_cond}"
    else:
        net = build_net(dataclasses.replace(cfg.net, label_dim=data.num_classes if cfg.conditional else 0))
    cfg.net = net.cfg
    return Built(cfg, net.to(device), teacher, note, teacher_info)


DIFFUSERS_PREFIX = "diffusers:"
DIFFUSERS_NET_PRESET = "diffusers"


def _diffusers_teacher(cfg: TrainConfig, data, device):
    """"diffusers:PATH" → (the loaded model and scheduler, the TrigFlow teacher); class-conditional teachers make the
    run class-conditional. σ_d is the run's loss.sigma_d (the std of the data in the teacher's space)."""
    from scm.diffusers.convert import num_classes
    from scm.diffusers.teacher import from_diffusers, load_diffusers

    loaded = load_diffusers(cfg.teacher.removeprefix(DIFFUSERS_PREFIX), device=device)
    resolution, channels = loaded.shape()
    if (resolution, channels) != (cfg.resolution, cfg.channels):
        raise ConfigError(f"teacher {cfg.teacher}: its network is {resolution}×{resolution}×{channels} but this run's "
                          f"data is {cfg.resolution}×{cfg.resolution}×{cfg.channels}", key="teacher")
    classes = num_classes(loaded.model)
    if classes is not None and not cfg.conditional:
        cfg.conditional = True
        check_data(cfg, data)
    if cfg.conditional and (classes is None or data.num_classes > classes):
        raise ConfigError(f"teacher {cfg.teacher}: {classes or 'no'} classes, but the data has {data.num_classes}",
                          key="teacher")
    fn = from_diffusers(loaded.model, loaded.scheduler, sigma_d=cfg.loss.sigma_d, data=cfg.teacher_data)
    return loaded, fn


def _teacher_info(cfg: TrainConfig, loaded, data) -> dict:
    """What RUN/teacher.json records of a diffusers teacher: σ_d is given (loss.sigma_d), the data's std measured."""
    return {"teacher": cfg.teacher, "model": type(loaded.model).__name__,
            "scheduler": type(loaded.scheduler).__name__, "parameterization": loaded.parameterization.describe(),
            "data": cfg.teacher_data, "sigma_d": cfg.loss.sigma_d, "data_std": _data_std(data)}


def _diffusers_student(cfg: TrainConfig, loaded, data, info: dict):
    """The sCD student as the diffusers teacher's own network (paper App. G.2, Sana-Sprint), with TrigFlow in/out,
    the w_φ head and the guidance input; (None, why) for a network scm cannot train as a student."""
    from scm.diffusers.net import student_from_diffusers

    try:
        net = student_from_diffusers(
            loaded.model, loaded.scheduler, sigma_d=cfg.loss.sigma_d, data=cfg.teacher_data,
            label_dim=data.num_classes if cfg.conditional else 0,
            guidance_embed=getattr(cfg.net, "guidance_embed", False),
            label_dropout=getattr(cfg.net, "label_dropout", 0.0))
    except ConfigError as e:
        return None, f"fresh initialization ({e}); {_sigma_note(info)}"
    return net, (f"initialized from the diffusers teacher {loaded.path} ({info['parameterization']}); "
                 f"{_sigma_note(info)}")


def _sigma_note(info: dict) -> str:
    return f"σ_d = {info['sigma_d']} (loss.sigma_d), the data's measured std is {info['data_std']:.3f}"


def _data_std(data, n: int = 4096) -> float:
    """The std of (up to n, evenly spaced) training examples: what σ_d should be (App. G.1)."""
    idx = torch.linspace(0, len(data) - 1, min(n, len(data))).long()
    return float(data.batch(idx)[0].double().std())


def _check_teacher_shapes(teacher, cfg: TrainConfig, data: ImageData | PreparedData, device) -> None:
    x = torch.zeros(2, cfg.channels, cfg.resolution, cfg.resolution, device=device)
    t = torch.tensor([0.5, 1.0], device=device)
    cond = {"labels": data.labels[:2].to(device)} if cfg.conditional else {}
    try:
        with torch.no_grad():
            out = teacher(x, t, **cond)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(f"teacher {cfg.teacher}: does not accept this run's inputs {tuple(x.shape)}: {e}") from None
    F = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(F, torch.Tensor) or F.shape != x.shape:
        shape = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
        raise ConfigError(f"teacher {cfg.teacher}: returns {shape} for inputs of shape {tuple(x.shape)}")


def build_objective(cfg: TrainConfig, teacher=None) -> DiffusionLoss | ConsistencyLoss:
    """The run's objective: the configured one (its fields as they are), handed the sCD teacher."""
    settings = {f.name: getattr(cfg.loss, f.name) for f in dataclasses.fields(cfg.loss)}
    if cfg.method == "diffusion":
        return DiffusionLoss(**settings)
    if settings["fused_pass"] is None and cfg.distributed == "fsdp":
        settings["fused_pass"] = False  # FSDP2's hooks have no forward-mode AD rule: separate tangent pass
    return ConsistencyLoss(**settings, teacher=teacher)


def load_teacher_factory(spec: str):
    """'package.module:function' → function() → a TrigFlow callable fn(x_t/σ_d, t, **cond) -> F."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"teacher={spec!r}: cannot import {attr!r} from {module_name!r} ({e})",
                          key="teacher") from None
    fn = factory()
    if not callable(fn):
        raise ConfigError(f"teacher={spec!r}: {attr}() must return a callable fn(x_scaled, t, **cond) -> F",
                          key="teacher")
    return fn
