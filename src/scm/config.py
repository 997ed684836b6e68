"""Typed training configuration and the named presets: the single source of truth of a run.

A run's configuration is a `TrainConfig` (nested dataclasses). It is built from a preset (one entry of
`PRESETS`: dotted keys → values), then the command line's flags, then `key=value` overrides of any field
(`loss.P_mean=-0.8`, `net.dropout=0.1`, `optim.betas=0.9,0.99`), each coerced to the field's type. The
resolved configuration is written as JSON next to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field

from scm.nets.unet import NET_PRESETS, UNetConfig

__all__ = [
    "PRESETS",
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "make_config",
    "resolve_preset",
    "to_dict",
]

METHODS = ("diffusion", "sct", "scd")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad preset, key or value; the message names it."""


@dataclass
class LossConfig:
    sigma_d: float = 0.5
    P_mean: float = -1.0
    P_std: float = 1.4
    adaptive_weight: bool = True
    warmup_kimg: float = 0.0                  # tangent warmup H (sCT/sCD), in kimg of training
    tangent_norm_c: float | None = 0.1        # None: no tangent normalization
    tangent_norm: str = "l2"                  # "l2" (paper) | "rms"
    extra_sigma_weight: bool = False          # Sana/FastGen's extra 1/σ factor (spec §2.7)
    share_dropout: bool = True
    fused_pass: bool | None = None            # one pass for tangent + training forward; None: yes unless FSDP
    tangent_method: str = "forward_ad"        # "forward_ad" | "func" | "finite_difference"
    tangent_precision: str = "inherit"        # "inherit" | "fp32" | "bf16" | "fp16"
    rearranged_jvp: bool = True
    guidance: tuple[float, float] | None = None  # sCD: guidance scale s ~ U[lo, hi] (needs net.guidance_embed)
    discrete_steps: int | None = None         # ablation: discrete-time CM with Δt = (π/2)/N


@dataclass
class OptimConfig:
    optimizer: str = "adam"                   # "adam" | "radam"
    lr: float = 1e-2                          # α_ref
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    lr_decay_kimg: float | None = None        # EDM2: lr = α_ref/sqrt(max(t/t_ref, 1)); None = constant
    lr_rampup_kimg: float = 0.0               # linear warm-up of the learning rate
    grad_clip: float | None = None            # clip the global gradient norm to this value


@dataclass
class EMAConfig:
    stds: tuple[float, ...] = (0.05,)         # EDM2 power-function EMA, one per relative std σ_rel


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
    resolution: int = 32                      # the data's resolution and channels this preset expects
    channels: int = 3
    conditional: bool = False                 # class-conditional on the data's labels
    teacher: str | None = None                # sCD: a diffusion run directory, or "module:function"
    teacher_ema: float | None = None          # σ_rel of the teacher's EMA to use (None: its first)
    init: str | None = None                   # start from this run's EMA (sCD: defaults to the teacher)
    init_ema: float | None = None
    net_preset: str = "tiny"
    net: UNetConfig = field(default_factory=UNetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log_every: int = 10                       # steps between metric lines
    ckpt_every_kimg: float = 10.0
    keep_ckpts: int = 3
    sample_every_kimg: float | None = 20.0    # sample grids at fixed seeds (None: only at the end)
    sample_count: int = 64
    sample_ode_steps: int = 12                # Heun steps of diffusion runs' sample grids (2N − 1 evaluations)
    max_bad_steps: int = 20                   # stop after this many consecutive non-finite steps
    tensorboard: bool = True                  # write TensorBoard events when tensorboard is installed
    progress: bool = True

    def validate(self) -> None:
        def need(ok: bool, key: str, value, what: str):
            if not ok:
                raise ConfigError(f"{key}={value!r}: {what}")

        need(self.method in METHODS, "method", self.method, f"must be one of {METHODS}")
        need(self.precision in PRECISIONS, "precision", self.precision, f"must be one of {PRECISIONS}")
        need(self.distributed in ("ddp", "fsdp"), "distributed", self.distributed, "must be 'ddp' or 'fsdp'")
        need(_finite(self.kimg) and self.kimg > 0, "kimg", self.kimg, "must be > 0")
        need(self.max_minutes is None or self.max_minutes > 0, "max_minutes", self.max_minutes, "must be > 0")
        need(isinstance(self.batch, int) and self.batch > 0, "batch", self.batch, "must be a positive int")
        need(self.grad_accum >= 1, "grad_accum", self.grad_accum, "must be >= 1")
        need(self.batch % self.grad_accum == 0, "batch", self.batch,
             f"must be divisible by grad_accum={self.grad_accum}")
        need(self.net_preset in NET_PRESETS, "net_preset", self.net_preset, f"must be one of {list(NET_PRESETS)}")
        L, O = self.loss, self.optim
        need(_finite(L.sigma_d) and L.sigma_d > 0, "loss.sigma_d", L.sigma_d, "must be > 0")
        need(_finite(L.P_std) and L.P_std > 0, "loss.P_std", L.P_std, "must be > 0")
        need(_finite(L.P_mean), "loss.P_mean", L.P_mean, "must be finite")
        need(L.warmup_kimg >= 0, "loss.warmup_kimg", L.warmup_kimg, "must be >= 0")
        need(L.tangent_norm_c is None or L.tangent_norm_c > 0, "loss.tangent_norm_c", L.tangent_norm_c, "must be > 0")
        need(L.tangent_norm in ("l2", "rms"), "loss.tangent_norm", L.tangent_norm, "must be 'l2' or 'rms'")
        need(L.tangent_method in ("forward_ad", "func", "finite_difference"), "loss.tangent_method",
             L.tangent_method, "must be forward_ad, func or finite_difference")
        need(L.discrete_steps is None or L.discrete_steps >= 1, "loss.discrete_steps", L.discrete_steps, "must be >= 1")
        need(L.tangent_precision in ("inherit", *PRECISIONS), "loss.tangent_precision", L.tangent_precision,
             "must be inherit, fp32, bf16 or fp16")
        if L.guidance is not None:
            need(self.method == "scd", "loss.guidance", L.guidance, "classifier-free guidance is for sCD only")
            need(0 < L.guidance[0] <= L.guidance[1], "loss.guidance", L.guidance,
                 "must be a range lo,hi with 0 < lo <= hi")
            need(self.net.guidance_embed, "loss.guidance", L.guidance, "needs net.guidance_embed=true")
            need(self.conditional, "loss.guidance", L.guidance, "needs a class-conditional run (conditional=true)")
        need(O.optimizer in ("adam", "radam"), "optim.optimizer", O.optimizer, "must be 'adam' or 'radam'")
        need(_finite(O.lr) and O.lr > 0, "optim.lr", O.lr, "must be > 0")
        need(all(0 <= b < 1 for b in O.betas), "optim.betas", O.betas, "must lie in [0, 1)")
        need(O.eps > 0, "optim.eps", O.eps, "must be > 0")
        need(O.lr_decay_kimg is None or O.lr_decay_kimg > 0, "optim.lr_decay_kimg", O.lr_decay_kimg, "must be > 0")
        need(O.lr_rampup_kimg >= 0, "optim.lr_rampup_kimg", O.lr_rampup_kimg, "must be >= 0")
        need(O.grad_clip is None or O.grad_clip > 0, "optim.grad_clip", O.grad_clip, "must be > 0")
        need(len(self.ema.stds) > 0 and all(0 < s < 0.3 for s in self.ema.stds), "ema.stds", self.ema.stds,
             "must be one or more σ_rel in (0, 0.28)")
        need(self.ckpt_every_kimg > 0, "ckpt_every_kimg", self.ckpt_every_kimg, "must be > 0")
        need(self.keep_ckpts >= 1, "keep_ckpts", self.keep_ckpts, "must be >= 1")
        need(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        need(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "must be >= 1")
        need(self.sample_count >= 1, "sample_count", self.sample_count, "must be >= 1")
        need(self.sample_ode_steps >= 1, "sample_ode_steps", self.sample_ode_steps, "must be >= 1")
        need(not (self.distributed == "fsdp" and L.fused_pass is True), "loss.fused_pass", L.fused_pass,
             "is not supported with distributed=fsdp (FSDP2's hooks have no forward-mode AD rule); "
             "use the separate tangent pass (loss.fused_pass=false)")
        if self.method == "scd":
            need(self.teacher is not None, "teacher", self.teacher, "sCD needs --teacher RUN_DIR")
        else:
            need(self.teacher is None, "teacher", self.teacher, f"only sCD uses a teacher (method is {self.method})")
        try:
            UNetConfig(**dataclasses.asdict(self.net))
        except ValueError as e:
            raise ConfigError(f"net: {e}") from None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------------------
# Presets: one entry each, dotted keys of TrainConfig. Paper settings from spec §4.7 (sCM App. G).
# kimg = iterations × batch / 1000; the CM learning rate is the teacher's × 0.01 (App. G.2).
# ------------------------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {}


def _preset(name: str, **kv) -> None:
    PRESETS[name] = {k.replace("__", "."): v for k, v in kv.items()}


def _cpu(res: int, ch: int) -> dict:
    return dict(net_preset="tiny", resolution=res, channels=ch, batch=64, ema__stds=(0.05, 0.1),
                ckpt_every_kimg=20.0, sample_every_kimg=40.0)


# Small CPU presets: the tiny net, minutes on a laptop. Tangent warm-up 1 kimg: the paper's H = 10k iterations is a
# few % of its runs, and these runs last 5–100 kimg.
for _res, _ch in ((28, 1), (32, 3)):
    _preset(f"tiny-{_res}-diffusion", **_cpu(_res, _ch), method="diffusion", kimg=200.0, optim__lr=1e-2,
            optim__lr_decay_kimg=64.0, optim__lr_rampup_kimg=2.0, loss__P_mean=-0.8, loss__P_std=1.6)
    _preset(f"tiny-{_res}-sct", **_cpu(_res, _ch), method="sct", kimg=100.0, optim__lr=1e-3,
            optim__lr_decay_kimg=64.0, loss__P_mean=-1.0, loss__P_std=1.4, loss__warmup_kimg=1.0)
    _preset(f"tiny-{_res}-scd", **_cpu(_res, _ch), method="scd", kimg=100.0, optim__lr=1e-3,
            optim__lr_decay_kimg=64.0, loss__P_mean=-1.0, loss__P_std=1.4, loss__warmup_kimg=1.0)

# CIFAR-10 (unconditional, 32×32): DDPM++-size net, batch 512. Teacher: EDM settings; CM: RAdam 1e-4, no schedule.
_C10 = dict(net_preset="cifar", resolution=32, channels=3, batch=512, ema__stds=(0.05,), ckpt_every_kimg=5000.0,
            sample_every_kimg=5000.0)
_preset("cifar10-diffusion", **_C10, method="diffusion", kimg=204800.0, optim__lr=1e-3, optim__betas=(0.9, 0.999),
        optim__eps=1e-8, net__dropout=0.13, loss__P_mean=-1.2, loss__P_std=1.2)
_preset("cifar10-sct", **_C10, method="sct", kimg=102400.0, optim__optimizer="radam", optim__lr=1e-4,
        optim__eps=1e-8, net__dropout=0.2, loss__P_mean=-1.0, loss__P_std=1.4, loss__warmup_kimg=5120.0)
_preset("cifar10-scd", **_C10, method="scd", kimg=102400.0, optim__optimizer="radam", optim__lr=1e-4,
        optim__eps=1e-8, net__dropout=0.0, loss__P_mean=-1.0, loss__P_std=1.4, loss__warmup_kimg=5120.0)

# ImageNet 64×64 (pixels) and 512×512 (64×64×4 SD-VAE latents), class-conditional, EDM2 config G, batch 2048.
# Per size: teacher α_ref, teacher iterations (k), teacher dropout, teacher EMA σ_rel, sCT dropout, sCD dropout.
_IMG64 = [("S", 1e-2, 1048, 0.0, 0.075, 0.45, 0.0), ("M", 9e-3, 1486, 0.1, 0.06, 0.45, 0.0),
          ("L", 8e-3, 761, 0.1, 0.04, 0.45, 0.0), ("XL", 7e-3, 540, 0.1, 0.04, 0.45, 0.0)]
_IMG512 = [("S", 1e-2, 1048, 0.0, 0.025, 0.25, 0.0), ("M", 9e-3, 1048, 0.1, 0.03, 0.35, 0.1),
           ("L", 8e-3, 696, 0.1, 0.015, 0.35, 0.1), ("XL", 7e-3, 598, 0.1, 0.02, 0.35, 0.1),
           ("XXL", 6.5e-3, 376, 0.1, 0.015, 0.35, 0.1)]
for _fam, _table, _ch, _tref, _P_t, _P_cm, _its in (
    ("img64", _IMG64, 3, 35, (-0.8, 1.6), (-1.0, 1.6), {"sct": 400, "scd": 400}),
    ("img512", _IMG512, 4, 70, (-0.4, 1.0), (-0.8, 1.6), {"sct": 100, "scd": 200}),
):
    for _size, _lr, _kit, _drop_t, _sigma, _drop_sct, _drop_scd in _table:
        _base = dict(net_preset=_size, resolution=64, channels=_ch, batch=2048, conditional=True, precision="fp16",
                     optim__betas=(0.9, 0.99), optim__eps=1e-11, optim__lr_decay_kimg=_tref * 2048.0,
                     ckpt_every_kimg=8192.0, sample_every_kimg=16384.0)
        _label_drop = 0.1 if _fam == "img512" else 0.0
        _preset(f"{_fam}-{_size}-diffusion", **_base, method="diffusion", kimg=_kit * 2048.0, optim__lr=_lr,
                optim__lr_rampup_kimg=10000.0, net__dropout=_drop_t, net__label_dropout=_label_drop,
                loss__P_mean=_P_t[0], loss__P_std=_P_t[1], ema__stds=(_sigma, 0.05))
        for _m, _drop in (("sct", _drop_sct), ("scd", _drop_scd)):
            _cm = dict(_base, method=_m, kimg=_its[_m] * 2048.0, optim__lr=_lr * 0.01, net__dropout=_drop,
                       loss__P_mean=_P_cm[0], loss__P_std=_P_cm[1], loss__warmup_kimg=10 * 2048.0,
                       ema__stds=(0.05,), init_ema=_sigma, teacher_ema=_sigma if _m == "scd" else None)
            if _m == "sct":
                _cm["net__dropout_max_res"] = 16  # sCT dropout only at resolutions <= 16
            if _m == "scd" and _fam == "img512":
                _cm.update(net__guidance_embed=True, loss__guidance=(1.0, 2.0))
            _preset(f"{_fam}-{_size}-{_m}", **_cm)


def resolve_preset(name: str, method: str | None = None) -> tuple[str, dict]:
    """Find a preset by full name ("tiny-28-scd") or by family and method ("tiny-28" + "scd")."""
    if name in PRESETS:
        if method is not None and PRESETS[name].get("method") != method:
            raise ConfigError(f"preset {name!r} is a {PRESETS[name]['method']} preset but --method is {method!r}")
        return name, PRESETS[name]
    if method is not None and f"{name}-{method}" in PRESETS:
        return f"{name}-{method}", PRESETS[f"{name}-{method}"]
    close = difflib.get_close_matches(name, list(PRESETS), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `scm presets` lists them"
    raise ConfigError(f"unknown preset {name!r}{hint}")


# ------------------------------------------------------------------------------------------------------------
# Typed overrides: "a.b=value" strings or dotted dicts, coerced to the field's type.
# ------------------------------------------------------------------------------------------------------------
def _field_map(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _coerce(value, tp, key: str):
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
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={value!r}: expected {len(args)} comma-separated values")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp in (int, float):
        try:
            if isinstance(value, str):
                v = float(value) if tp is float else int(float(value)) if float(value).is_integer() else None
                if v is None:
                    raise ValueError
                return v
            if isinstance(value, bool):
                raise ValueError
            if tp is int and not float(value).is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected {'an integer' if tp is int else 'a number'}") from None
    if tp is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _resolved_hints(cls) -> dict:
    return typing.get_type_hints(cls)


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
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            tp = _resolved_hints(type(obj))[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a group of settings; set its fields, e.g. {key}.<field>=...")
            setattr(obj, part, _coerce(value, tp, key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is not a group")


def apply_overrides(cfg: TrainConfig, overrides: dict | list[str]) -> TrainConfig:
    """Apply {"a.b": value} or ["a.b=value", ...] to cfg (in place) and return it."""
    for k, v in _parse_overrides(overrides).items():
        set_key(cfg, k, v)
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
    as data=, out=, kimg=, batch=; None means not given), then key=value overrides. The network is the
    preset's `net_preset` for the configured resolution and channels, with every net.* override applied."""
    name, entries = resolve_preset(preset, method)
    merged = {**entries, **{k: v for k, v in flags.items() if v is not None}, **_parse_overrides(overrides)}
    cfg = TrainConfig(preset=name)
    for k, v in merged.items():
        if not k.startswith("net."):
            set_key(cfg, k, v)
    if cfg.net_preset not in NET_PRESETS:
        raise ConfigError(f"net_preset={cfg.net_preset!r}: must be one of {list(NET_PRESETS)}")
    try:
        cfg.net = UNetConfig(**NET_PRESETS[cfg.net_preset], img_resolution=cfg.resolution, img_channels=cfg.channels)
        for k, v in merged.items():
            if k.startswith("net."):
                set_key(cfg, k, v)
        cfg.net.__post_init__()
    except ValueError as e:
        raise ConfigError(f"net: {e}") from None
    cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, cls=TrainConfig):
    """Rebuild a config from its JSON form; unknown keys are an error (they name a different version)."""
    hints = _resolved_hints(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in hints:
            raise ConfigError(f"unknown config key {k!r} in {cls.__name__}")
        tp = hints[k]
        kwargs[k] = from_dict(v, tp) if dataclasses.is_dataclass(tp) else _coerce(v, tp, k) if v is not None else None
    return cls(**kwargs)
