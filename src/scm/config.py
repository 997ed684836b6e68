"""Typed training configuration: the single source of truth of a run.

A run's configuration is a `TrainConfig` (nested dataclasses). Its `loss` is the training objective itself
(`scm.objectives.DiffusionLoss` or `ConsistencyLoss`, by `method`): the objective's fields are the settings, so
they are defined, documented and validated once, in the objective. It is built from a preset
(`scm.presets.PRESETS`), then the command line's flags, then `key=value` overrides of any field
(`loss.P_mean=-0.8`, `net.dropout=0.1`, `optim.betas=0.9,0.99`), each coerced to the field's type. The resolved
configuration is written as JSON next to the checkpoints.

This module checks only what relates settings of different parts (a guided sCD needs a network with a guidance
input, …) and turns the parts' own errors into `ConfigError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field

from scm._checks import sizes
from scm.ema_profile import SIGMA_REL_MAX
from scm.errors import ConfigError, InvalidSetting
from scm.lora_config import LoRAConfig
from scm.nets.registry import NET_PRESETS, NetConfig, config_class, net_config
from scm.nets.unet import UNetConfig
from scm.objectives import OBJECTIVES, ConsistencyLoss, DiffusionLoss
from scm.precision import PRECISIONS
from scm.presets import FAMILIES, PRESETS
from scm.sampling import T_MID, check_t_mid
from scm.teachers import TEACHER_DTYPES
from scm.text import TextConfig
from scm.trigflow import t_max_default

__all__ = [
    "ConfigError",
    "EMAConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "make_config",
    "resolve_preset",
    "to_dict",
]

METHODS = tuple(OBJECTIVES)
OPTIMIZERS = ("adam", "radam")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class OptimConfig:
    optimizer: str = "adam"                   # "adam" | "radam"
    lr: float = 1e-2                          # α_ref
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    lr_decay_kimg: float | None = None        # EDM2: lr = α_ref/sqrt(max(t/t_ref, 1)); None = constant
    lr_rampup_kimg: float = 0.0               # linear warm-up of the learning rate
    grad_clip: float | None = None            # clip the global gradient norm to this value
    critic_lr_scale: float = 1.0              # sCD + VSD: the critic's learning rate, as a multiple of the student's

    def validate(self) -> None:
        _need(self.optimizer in OPTIMIZERS, "optim.optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        _need(_finite(self.lr) and self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _need(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "must lie in [0, 1)")
        _need(_finite(self.eps) and self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _need(self.lr_decay_kimg is None or self.lr_decay_kimg > 0, "optim.lr_decay_kimg", self.lr_decay_kimg,
              "must be > 0")
        _need(self.lr_rampup_kimg >= 0, "optim.lr_rampup_kimg", self.lr_rampup_kimg, "must be >= 0")
        _need(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "must be > 0")
        _need(_finite(self.critic_lr_scale) and self.critic_lr_scale > 0, "optim.critic_lr_scale",
              self.critic_lr_scale, "must be > 0")


@dataclass
class EMAConfig:
    stds: tuple[float, ...] = (0.05,)         # EDM2 power-function EMA, one per relative std σ_rel
    # Snapshots of every profile in ema.stds each time training passes a multiple of this many kimg (and at the
    # last step), for post-hoc EMA (`scm ema`); 0 or None: none. 2.5 kimg keeps 10–40 snapshots for CPU runs of
    # 25–100 kimg (15 MB each for the tiny U-Net's two profiles; a 5 kimg run wants 0.5). The paper presets use
    # EDM2's 8Mi images.
    snapshot_kimg: float | None = 2.5

    def validate(self) -> None:
        _need(len(self.stds) > 0 and all(0 < s < SIGMA_REL_MAX for s in self.stds), "ema.stds", self.stds,
              f"must be one or more σ_rel in (0, {SIGMA_REL_MAX})")
        _need(self.snapshot_kimg is None or (_finite(self.snapshot_kimg) and self.snapshot_kimg >= 0),
              "ema.snapshot_kimg", self.snapshot_kimg, "must be >= 0 (0 or None: no snapshots)")


@dataclass
class TrainConfig:
    preset: str = ""
    method: str = "diffusion"                 # "diffusion" (teacher) | "sct" | "scd"
    data: str = ""
    out: str = ""
    kimg: float = 100.0                       # training budget, thousands of images
    max_minutes: float | None = None          # also stop (normally, with a checkpoint) after this wall time
    batch: int = 64                           # global batch size
    grad_accum: int = 1                       # micro-batches per step (per process)
    seed: int = 0
    device: str = "auto"                      # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "fp32"                   # autocast: "fp32" | "bf16" | "fp16" (fp32 master weights)
    distributed: str = "ddp"                  # under torchrun: "ddp" | "fsdp" (FSDP2 fully_shard)
    resolution: int | tuple[int, ...] = 32    # the data's size this preset expects: R (R×R images) or (H, W) …
    channels: int = 3                         # … and its channels
    frames: int = 0                           # video: frames per clip, items [C, frames, H, W] (0: not video)
    length: int = 0                           # audio: samples per clip, items [C, length] (0: not audio; then
                                              # resolution is not used)
    conditional: bool = False                 # class-conditional on the data's labels
    text: TextConfig = field(default_factory=TextConfig)  # a text network's prompts: the data's encoder (resolved)
                                              # and text.caption_dropout (training)
    teacher: str | None = None                # sCD: a diffusion run directory, "diffusers:PATH" or "module:function"
    teacher_data: str = "own"                 # diffusers teachers: scm's data is the teacher's own ("own") or the
                                              # teacher's data is x0/σ_d ("unit", Sana-Sprint's convention)
    teacher_ema: float | None = None          # σ_rel of the teacher's EMA to use (None: its first)
    teacher_dtype: str = "fp32"               # the teacher's weights and calls: "fp32" | "bf16" | "fp16" (half memory)
    teacher_offload: bool = False             # keep the teacher on the CPU between calls (CUDA; one copy per call)
    init: str | None = None                   # start from this run's EMA (sCD: defaults to the teacher)
    init_ema: float | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # sCD of a diffusers teacher: a student of low-rank adapters
                                              # on the teacher's frozen network (lora.rank > 0), which is the teacher
    net_preset: str = "tiny"                 # a U-Net (tiny, cifar, S…XXL) or transformer (dit-tiny, DiT-S/2…) preset
    net: NetConfig = field(default_factory=UNetConfig)  # the network of `net_preset` (U-Net, DiT, diffusers), resolved
    loss: DiffusionLoss | ConsistencyLoss = field(default_factory=DiffusionLoss)  # the objective of `method`
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log_every: int = 10                       # steps between metric lines (and the only steps that read losses)
    ckpt_every_kimg: float = 10.0
    keep_ckpts: int = 3
    sample_every_kimg: float | None = 20.0    # sample grids at fixed seeds (None: only at the end)
    sample_count: int = 64
    sample_ode_steps: int = 12                # Heun steps of diffusion runs' sample grids (2N − 1 evaluations)
    t_mid: float = T_MID                      # consistency runs: the intermediate time of 2-step sampling (§5.2),
                                              # every sampler's default for this run (grids, sample, eval, serve,
                                              # export); N > 2 steps space theirs below it
    max_bad_steps: int = 20                   # stop after this many consecutive non-finite steps
    tensorboard: bool = True                  # write TensorBoard events when tensorboard is installed
    progress: bool = True

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one item of the run's data, channels first: (C, H, W) for images, (C, T, H, W) for video
        (`frames`), (C, L) for audio (`length`)."""
        if self.length:
            return (self.channels, self.length)
        return (self.channels, *((self.frames,) if self.frames else ()), *sizes(self.resolution))

    def validate(self) -> None:
        """Check every field; the parts (objective, network) check their own fields, named here by key."""
        _need(self.method in METHODS, "method", self.method, f"must be one of {METHODS}")
        _part("", lambda: sizes(self.resolution))
        _need(isinstance(self.channels, int) and self.channels >= 1, "channels", self.channels, "must be >= 1")
        for key in ("frames", "length"):
            value = getattr(self, key)
            _need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key, value, "must be >= 0")
        _need(not (self.frames and self.length), "length", self.length, "audio has no frames (set frames=0)")
        _need(type(self.loss) is OBJECTIVES[self.method], "loss", type(self.loss).__name__,
              f"method {self.method} trains with {OBJECTIVES[self.method].__name__}")
        _need(self.precision in PRECISIONS, "precision", self.precision, f"must be one of {tuple(PRECISIONS)}")
        _need(self.distributed in DISTRIBUTED, "distributed", self.distributed, f"must be one of {DISTRIBUTED}")
        _need(_finite(self.kimg) and self.kimg > 0, "kimg", self.kimg, "must be > 0")
        _need(self.max_minutes is None or self.max_minutes > 0, "max_minutes", self.max_minutes, "must be > 0")
        _need(isinstance(self.batch, int) and self.batch > 0, "batch", self.batch, "must be a positive int")
        _need(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")
        _need(self.batch % self.grad_accum == 0, "batch", self.batch,
              f"must be divisible by grad_accum={self.grad_accum}")
        _need(self.net_preset in NET_PRESETS, "net_preset", self.net_preset, f"must be one of {list(NET_PRESETS)}")
        _need(self.ckpt_every_kimg > 0, "ckpt_every_kimg", self.ckpt_every_kimg, "must be > 0")
        for key in ("keep_ckpts", "log_every", "max_bad_steps", "sample_count", "sample_ode_steps"):
            _need(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        _part("loss", self.loss.validate)
        try:
            check_t_mid(self.t_mid, t_max_default(self.loss.sigma_d))  # σ_d was checked by the loss
        except InvalidSetting as e:
            raise ConfigError(str(e), key="t_mid") from None
        _need(type(self.net) is config_class(self.net_preset), "net", type(self.net).__name__,
              f"net_preset {self.net_preset} is a {config_class(self.net_preset).__name__}")
        _part("net", lambda: type(self.net)(**dataclasses.asdict(self.net)))
        _need(len(self.net.img_shape) == len(self.shape), "net_preset", self.net_preset,
              f"takes items of shape {self.net.img_shape}, the run's are {self.shape} (video runs set frames, audio "
              "runs length, with a video or audio network)")
        self.optim.validate()
        self.ema.validate()
        _part("text", self.text.validate)
        _part("lora", self.lora.validate)
        _need(self.teacher_dtype in TEACHER_DTYPES, "teacher_dtype", self.teacher_dtype,
              f"must be one of {tuple(TEACHER_DTYPES)}")
        held = self.teacher_dtype != "fp32" or self.teacher_offload
        _need(not held or self.method == "scd", "teacher_dtype", self.teacher_dtype, "only sCD has a teacher")
        _need(not (held and self.lora.rank), "teacher_dtype" if self.teacher_dtype != "fp32" else "teacher_offload",
              self.teacher_dtype if self.teacher_dtype != "fp32" else True,
              "a LoRA student's teacher is its own frozen base, held as the student is")
        _need(not (self.teacher_offload and self.distributed == "fsdp"), "teacher_offload", True,
              "is not supported with distributed=fsdp, which shards the teacher across the processes instead")
        if self.lora.rank:
            diffusers_teacher = str(self.teacher or "").startswith("diffusers:")
            _need(self.method == "scd" and diffusers_teacher and self.init is None, "lora.rank", self.lora.rank,
                  "adapters train on a diffusers teacher's own network: sCD with teacher=diffusers:PATH (no init)")
        L = self.loss
        if getattr(L, "guidance", None) is not None:
            _need(self.method == "scd", "loss.guidance", L.guidance, "classifier-free guidance is for sCD only")
            _need(self.net.guidance_embed, "loss.guidance", L.guidance, "needs net.guidance_embed=true")
            # a diffusers teacher's own network (made at resolve) may take prompts: checked again then
            pending = str(self.teacher or "").startswith("diffusers:") and self.net_preset != "diffusers"
            _need(self.conditional or bool(getattr(self.net, "text_dim", 0)) or pending, "loss.guidance",
                  L.guidance, "needs a class-conditional run (conditional=true) or a text network")
        _need(not (self.distributed == "fsdp" and getattr(L, "fused_pass", None) is True), "loss.fused_pass",
              True, "is not supported with distributed=fsdp (FSDP2's hooks have no forward-mode AD rule); "
              "use the separate tangent pass (loss.fused_pass=false)")
        _need(not (getattr(self.net, "checkpointing", False) and getattr(L, "fused_pass", None) is True),
              "loss.fused_pass", True, "is not supported with net.checkpointing=true (the recomputation has no "
              "tangent); use the separate tangent pass (loss.fused_pass=false)")
        if getattr(L, "vsd_weight", 0):
            _need(self.method == "scd", "loss.vsd_weight", L.vsd_weight, "VSD needs a teacher: it is for sCD only")
            _need(not self.lora.rank, "loss.vsd_weight", L.vsd_weight, "is not supported with a LoRA student (the "
                  "critic is a full copy of the teacher's network)")
        _need(self.teacher_data in ("own", "unit"), "teacher_data", self.teacher_data, "must be 'own' or 'unit'")
        if self.method == "scd":
            _need(self.teacher is not None, "teacher", self.teacher, "sCD needs a teacher (a diffusion run directory)")
        else:
            _need(self.teacher is None, "teacher", self.teacher, f"only sCD uses a teacher (method is {self.method})")


def _need(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {what}", key=key)


def _part(prefix: str, check) -> None:
    """Run a part's own validation; its error, re-raised as a ConfigError naming `prefix.<field>`."""
    try:
        check()
    except InvalidSetting as e:
        key = f"{prefix}.{e.key}" if prefix else e.key
        raise ConfigError(f"{key}={e.value!r}: {e.reason}", key=key) from None
    except ValueError as e:
        raise ConfigError(f"{prefix}: {e}", key=prefix) from None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def resolve_preset(name: str, method: str | None = None) -> tuple[str, dict]:
    """Find a preset by full name ("tiny-28-scd") or by family and method ("tiny-28" + "scd")."""
    if name in PRESETS:
        if method is not None and PRESETS[name]["method"] != method:
            raise ConfigError(f"preset {name!r} is a {PRESETS[name]['method']} preset, not {method}", key="method")
        return name, PRESETS[name]
    if name in FAMILIES:
        if method is None:
            raise ConfigError(f"{name!r} is a family of presets: choose its method ({', '.join(FAMILIES[name])})",
                              key="method")
        if method not in FAMILIES[name]:
            raise ConfigError(f"family {name!r} has no {method!r} preset (methods: {', '.join(FAMILIES[name])})",
                              key="method")
        return f"{name}-{method}", PRESETS[f"{name}-{method}"]
    close = difflib.get_close_matches(name, [*FAMILIES, *PRESETS], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown preset {name!r}{hint}", key="preset")


# ------------------------------------------------------------------------------------------------------------
# Typed overrides: "a.b=value" strings or dotted dicts, coerced to the field's type.
# ------------------------------------------------------------------------------------------------------------
def _field_map(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def coerce(value, tp, key: str):
    """Coerce a string (from the command line) or a Python value to the annotated type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}", key=key)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={value!r}: expected {len(args)} comma-separated values", key=key)
        return tuple(coerce(v, a, key) for v, a in zip(items, args, strict=True))
    if tp is dict or origin is dict:  # a JSON object, kept as it is (a diffusers network's own config)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a JSON object", key=key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r}: expected true or false", key=key)
    if tp in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if tp is int:
                if not float(number).is_integer():
                    raise ValueError
                return int(number)
            return float(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}={value!r}: expected {'an integer' if tp is int else 'a number'}",
                              key=key) from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r}: expected a string", key=key)
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}", key=key)


def set_key(cfg, key: str, value) -> None:
    """Set the dotted `key` of a nested dataclass config, coercing `value` to the field's type."""
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        fields_ = _field_map(obj)
        if part not in fields_:
            path = ".".join(parts[:i])
            options = [f"{path}.{n}" if path else n for n in fields_]
            close = difflib.get_close_matches(key, options, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" ({type(obj).__name__}, the objective of method {cfg.method})" if path == "loss" else ""
            raise ConfigError(f"unknown config key {key!r}{where}{hint}", key=key)
        current = getattr(obj, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(current):
                raise ConfigError(f"{key} is a group of settings; set its fields, e.g. {key}.<field>=...", key=key)
            setattr(obj, part, coerce(value, typing.get_type_hints(type(obj))[part], key))
        elif dataclasses.is_dataclass(current):
            obj = current
        else:
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is not a group", key=key)


def apply_overrides(cfg: TrainConfig, overrides: dict | list[str]) -> TrainConfig:
    """Apply {"a.b": value} or ["a.b=value", ...] to cfg (in place), validate and return it."""
    for k, v in _parse_overrides(overrides).items():
        set_key(cfg, k, v)
    cfg.validate()
    return cfg


def _parse_overrides(overrides) -> dict:
    if isinstance(overrides, dict):
        return dict(overrides)
    pairs = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        pairs[k.strip()] = v.strip()
    return pairs


def make_config(preset: str, method: str | None = None, overrides=(), **flags) -> TrainConfig:
    """Resolve a run's configuration: preset entries, then the command line's flags (top-level fields such
    as data=, out=, kimg=, batch=; None means not given), then key=value overrides. The objective is the
    method's with its defaults, the network the preset's `net_preset` for the configured resolution and
    channels; then every loss.* and net.* entry is applied."""
    name, entries = resolve_preset(preset, method)
    merged = {**entries, **{k: v for k, v in flags.items() if v is not None}, **_parse_overrides(overrides)}
    cfg = TrainConfig(preset=name)
    parts = ("net.", "loss.")
    for k, v in merged.items():
        if not k.startswith(parts):
            set_key(cfg, k, v)
    _need(cfg.method in METHODS, "method", cfg.method, f"must be one of {METHODS}")
    _need(cfg.net_preset in NET_PRESETS, "net_preset", cfg.net_preset, f"must be one of {list(NET_PRESETS)}")
    cfg.loss = OBJECTIVES[cfg.method]()
    item = _item_fields(cfg)
    _part("net", lambda: setattr(cfg, "net", net_config(cfg.net_preset, img_channels=cfg.channels, **item)))
    for k, v in merged.items():
        if k.startswith(parts):
            set_key(cfg, k, v)
    cfg.validate()
    return cfg


def _item_fields(cfg: TrainConfig) -> dict:
    """The network config's fields that give its item's sizes: the resolution, and the frames of a video run; the
    length of an audio run. ConfigError when the preset's network takes no such field (an image network for video)."""
    fields = {"length": cfg.length} if cfg.length else {"img_resolution": cfg.resolution}
    if cfg.frames:
        fields["frames"] = cfg.frames
    known = {f.name for f in dataclasses.fields(config_class(cfg.net_preset))}
    for key in ("frames", "length"):
        _need(key not in fields or key in known, key, fields.get(key),
              f"net_preset {cfg.net_preset} is not a {'video' if key == 'frames' else 'audio'} network")
    return fields


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _without_network_sigma_d(d: dict) -> dict:
    """A run's σ_d is its `loss.sigma_d` alone; configurations written before recorded a network's own `net.sigma_d`
    too (used only by the c_noise="log_sigma" ablation and by diffusers students). It is dropped where it agrees
    with loss.sigma_d or was not used, and refused where the network computed with another value."""
    net = d.get("net")
    if not (isinstance(net, dict) and "sigma_d" in net):
        return d
    net = dict(net)
    old, run = net.pop("sigma_d"), (d.get("loss") or {}).get("sigma_d", 0.5)
    if (net.get("c_noise") == "log_sigma" or d.get("net_preset") == "diffusers") and old != run:
        raise ConfigError(f"net.sigma_d={old!r}: this network was built for σ_d = {old}, but the run's loss.sigma_d "
                          f"is {run} (σ_d is the run's alone now; set loss.sigma_d={old} to keep the network as "
                          "it was)", key="net.sigma_d")
    return {**d, "net": net}


def from_dict(d: dict, cls=TrainConfig):
    """Rebuild a config from its JSON form; unknown keys are an error (they name a different version)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
    if cls is TrainConfig:
        d = _without_network_sigma_d(d)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"unknown config key {k!r} in {cls.__name__}", key=k)
        tp = hints[k]
        if cls is TrainConfig and k == "loss":
            tp = OBJECTIVES.get(d.get("method", "diffusion"), DiffusionLoss)
        if cls is TrainConfig and k == "net":
            preset = d.get("net_preset", "tiny")
            if preset not in NET_PRESETS:
                raise ConfigError(f"net_preset={preset!r}: must be one of {list(NET_PRESETS)}", key="net_preset")
            tp = config_class(preset)
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(v, tp)
        else:
            kwargs[k] = coerce(v, tp, k) if v is not None else None
    try:
        return cls(**kwargs)
    except InvalidSetting as e:
        raise ConfigError(f"{cls.__name__}.{e}", key=e.key) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None
