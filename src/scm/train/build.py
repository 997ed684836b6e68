"""Build a run's objects from its resolved configuration (`scm.train.resolve`): the sCD teacher (loaded), the
network (fresh, or with the weights its configuration names: the init run's EMA, or a diffusers teacher's own
network) and the objective (the configured one, handed its teacher and the run's unconditional input). Nothing
here decides configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from scm.conditioning import Conditioning
from scm.config import TrainConfig
from scm.data.dataset import Dataset
from scm.errors import ConfigError
from scm.nets.registry import build_net
from scm.objectives import ConsistencyLoss, DiffusionLoss
from scm.runs import load_run
from scm.teachers import TEACHER_DTYPES, HeldTeacher, LoadedTeacher, load_teacher, open_teacher
from scm.train.resolve import DIFFUSERS_NET_PRESET, architecture, diffusers_student

__all__ = ["Built", "build", "build_objective"]


@dataclass
class Built:
    net: torch.nn.Module
    teacher: object | None            # the sCD teacher's fn(x_t/σ_d, t, **cond) -> F
    init_note: str                    # where the network's weights come from, for the log
    teacher_info: dict | None = None  # recorded in RUN/teacher.json (diffusers teachers)
    teacher_module: torch.nn.Module | None = None  # the teacher's network (sharded with FSDP2 under distributed=fsdp)
    critic: torch.nn.Module | None = None  # sCD + VSD: the fake score φ, trained alongside (initialized as the teacher)


def build(cfg: TrainConfig, data: Dataset, device: torch.device) -> Built:
    """The teacher, then the network with its initial weights, for the resolved configuration `cfg`. Random numbers
    are drawn in a fixed order (the teacher's and the init run's networks are built before the student), so the
    student's fresh parameters are a function of the seed."""
    host = cfg.teacher_offload and torch.device(device).type != "cpu"  # read onto the CPU, moved per call
    teacher = load_teacher(open_teacher(cfg.teacher), ema=cfg.teacher_ema, sigma_d=cfg.loss.sigma_d,
                           data=cfg.teacher_data, device="cpu" if host else device) if cfg.method == "scd" else None
    if teacher is not None:
        _check_teacher_call(teacher, cfg, data, "cpu" if host else device)
    init = load_run(cfg.init, cfg.init_ema, device=device) if cfg.init is not None else None
    net = build_net(cfg.net, cfg.loss.sigma_d)
    if init is not None:
        misfit = _load_but_guidance(net, init.net.state_dict())
        if misfit:
            raise ConfigError(f"init {cfg.init}: weights do not fit ({misfit})", key="init")
    elif cfg.net_preset == DIFFUSERS_NET_PRESET:
        from scm.diffusers.net import copy_teacher_weights

        copy_teacher_weights(net, teacher.model)
    critic = _critic(cfg, teacher) if getattr(cfg.loss, "vsd_weight", 0) else None  # before the teacher is held
    info = _teacher_info(cfg, teacher, data) if teacher is not None and teacher.model is not None else None
    note, fn = _init_note(cfg, teacher, data, info), None if teacher is None else teacher.fn
    module = None if teacher is None else _teacher_module(teacher, cfg)
    if module is not None and (cfg.teacher_dtype != "fp32" or cfg.teacher_offload):
        fn = HeldTeacher(fn, module, device, TEACHER_DTYPES[cfg.teacher_dtype], cfg.teacher_offload)
        note += f"; the teacher held in {cfg.teacher_dtype}" + (", on the CPU between calls" if host else "")
    if cfg.lora.rank:  # the teacher is the student's own frozen base (scm.diffusers.lora): its copy is let go
        from scm.diffusers.lora import BaseTeacher

        fn = BaseTeacher(net, takes_guidance=getattr(fn, "takes_guidance", False))
        note += f"; LoRA rank {cfg.lora.rank} on {len(net.adapted)} layers, the base frozen and shared with the teacher"
        module = teacher = None
    if critic is not None:
        note += "; a VSD critic initialized as the teacher"
    return Built(net.to(device), fn, note, info, module, None if critic is None else critic.to(device))


def _critic(cfg: TrainConfig, teacher: LoadedTeacher) -> torch.nn.Module:
    """sCD + VSD's critic φ (the fake score): the student's architecture (its guidance input included) holding the
    teacher's weights, in fp32, so that at the start it is the teacher's diffusion model (the guidance input, which
    the teacher has not, starts fresh, as a student's does). A teacher whose network is not of that architecture (a
    function, or a run of another network) is refused."""
    critic = build_net(cfg.net, cfg.loss.sigma_d)
    if cfg.net_preset == DIFFUSERS_NET_PRESET:
        from scm.diffusers.net import copy_teacher_weights

        copy_teacher_weights(critic, teacher.model)
        return critic.train()
    if not isinstance(teacher.fn, torch.nn.Module):
        problem = "the teacher is a function, not a network"
    else:
        misfit = _load_but_guidance(critic, teacher.fn.state_dict())
        problem = misfit and f"the teacher's network does not fit the student's ({misfit})"
    if problem:
        raise ConfigError(f"loss.vsd_weight={cfg.loss.vsd_weight}: the VSD critic starts as a copy of the teacher in "
                          f"the student's architecture, but {problem}", key="loss.vsd_weight")
    return critic.train()


def _load_but_guidance(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Load `state` into `net`, whose guidance input alone may be missing from it (it then starts fresh); what does
    not fit, or None."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any("guidance" not in k for k in missing):
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    return None


def _teacher_module(teacher: LoadedTeacher, cfg: TrainConfig) -> torch.nn.Module | None:
    """The network a teacher computes with (a diffusers model, or a run's network); None for a function given as
    module:function, which teacher_dtype and teacher_offload cannot hold (ConfigError)."""
    module = teacher.model if teacher.model is not None else teacher.fn
    if isinstance(module, torch.nn.Module):
        return module
    if cfg.teacher_dtype != "fp32" or cfg.teacher_offload:
        raise ConfigError(f"teacher={cfg.teacher}: a teacher given as a function is not a network scm can hold in "
                          "another dtype or on the CPU", key="teacher_dtype")
    return None


def _init_note(cfg: TrainConfig, teacher: LoadedTeacher | None, data: Dataset, info: dict | None) -> str:
    if cfg.init is not None:
        return (f"initialized from {cfg.init} (EMA σ_rel={cfg.init_ema or 'first'})"
                + (", class-conditional" if cfg.conditional else ""))
    if info is not None:
        sigma = f"σ_d = {info['sigma_d']} (loss.sigma_d), the data's measured std is {info['data_std']:.3f}"
        if cfg.net_preset == DIFFUSERS_NET_PRESET:
            where = teacher.source.folder.path
            return f"initialized from the diffusers teacher {where} ({info['parameterization']}); {sigma}"
        return f"fresh initialization ({diffusers_student(cfg, teacher.source, data)[1]}); {sigma}"
    if teacher is not None and teacher.source.kind == "run":
        return (f"fresh initialization (the teacher is a {architecture(teacher.source.run_cfg.net)}, this preset's "
                f"network a {architecture(cfg.net)})")
    return "fresh initialization"


def _teacher_info(cfg: TrainConfig, teacher: LoadedTeacher, data: Dataset) -> dict:
    """What RUN/teacher.json records of a diffusers teacher: σ_d is given (loss.sigma_d), the data's std measured."""
    return {"teacher": cfg.teacher, "model": type(teacher.model).__name__,
            "scheduler": type(teacher.scheduler).__name__, "parameterization": teacher.fn.parameterization.describe(),
            "data": cfg.teacher_data, "sigma_d": cfg.loss.sigma_d, "data_std": _data_std(data)}


def _data_std(data: Dataset, n: int = 4096) -> float:
    """The std of (up to n, evenly spaced) training examples: what σ_d should be (App. G.1)."""
    idx = torch.linspace(0, len(data) - 1, min(n, len(data))).long()
    return float(data.batch(idx)[0].double().std())


def _check_teacher_call(teacher: LoadedTeacher, cfg: TrainConfig, data: Dataset, device) -> None:
    """The teacher takes two of the run's inputs (its conditioning included) and returns F of their shape."""
    x = torch.zeros(2, *cfg.shape, device=device)
    t = torch.tensor([0.5, 1.0], device=device)
    cond = Conditioning.of_run(cfg).from_batch(data.batch(torch.arange(2) % len(data), device)[1])
    if getattr(teacher.fn, "takes_guidance", False) and getattr(cfg.loss, "guidance", None):
        cond["guidance"] = float(cfg.loss.guidance[0])  # a guidance-distilled teacher (Flux-dev) takes the scale
    try:
        with torch.no_grad():
            out = teacher.fn(x, t, **cond)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(f"teacher {cfg.teacher}: does not accept this run's inputs {tuple(x.shape)}: {e}") from None
    F = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(F, torch.Tensor) or F.shape != x.shape:
        shape = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
        raise ConfigError(f"teacher {cfg.teacher}: returns {shape} for inputs of shape {tuple(x.shape)}")


def build_objective(cfg: TrainConfig, teacher=None) -> DiffusionLoss | ConsistencyLoss:
    """The run's objective: the configured one (its fields as they are), handed the sCD teacher and, for a guided
    teacher, the run's unconditional input (`Conditioning.null`)."""
    settings = {f.name: getattr(cfg.loss, f.name) for f in dataclasses.fields(cfg.loss)}
    if cfg.method == "diffusion":
        return DiffusionLoss(**settings)
    separate = (cfg.distributed == "fsdp" or getattr(cfg.net, "checkpointing", False)
                or architecture(cfg.net) == "DiffusersNet")
    if settings["fused_pass"] is None and separate:
        # FSDP2's hooks have no forward-mode AD rule; activation checkpointing recomputes a pass without tangents
        # (scm.nets.layers.Network.block); a diffusers network's ops record their tangents for the backward (no
        # custom rules), so its fused pass held 2-3× the memory and was no faster (benchmarks/results/memory-*.md)
        settings["fused_pass"] = False
    return ConsistencyLoss(**settings, teacher=teacher, teacher_uncond=Conditioning.of_run(cfg).null())
