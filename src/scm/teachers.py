"""Teachers: other diffusion parameterizations presented as a TrigFlow network F (paper App. B.2), and the teacher a
user names, opened and loaded.

Each adapter returns `fn(x_scaled, t, **cond) -> F` with x_scaled = x_t/σ_d, the calling convention of
every scm network. The time map, the input scaling and the output combination all live inside `fn`, so
forward-mode AD (`scm.tangents.jvp_tangent`) differentiates through them: a wrapped teacher can serve sCD
(which only needs F) and a wrapped network can even be fine-tuned as an sCM student.

A teacher is named as a diffusion run directory, "diffusers:PATH" (a diffusers pipeline or model folder,
`scm.diffusers`) or "module:function" (a function that returns an fn). `open_teacher` describes it from its
configuration files alone (its kind, the shape and classes of its network, the space of its data), which is what a
run's configuration is resolved from (`scm.train.resolve`); `load_teacher` then reads its weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scm._checks import check_choice, check_positive, check_t
from scm.errors import ConfigError
from scm.precision import compute_dtype
from scm.trigflow import expand

__all__ = ["DIFFUSERS_PREFIX", "TEACHER_DTYPES", "HeldTeacher", "LoadedTeacher", "TeacherSource", "from_edm",
           "from_flow", "load_teacher", "load_teacher_factory", "open_teacher"]

DIFFUSERS_PREFIX = "diffusers:"
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # `teacher_dtype`

TrigFlowFn = Callable[..., torch.Tensor]


def from_edm(D: Callable[..., torch.Tensor], sigma_d: float) -> TrigFlowFn:
    """Wrap an EDM denoiser D(x_σ, σ, **cond) ≈ E[x0 | x0 + σ·n = x_σ], n ~ N(0, I), as a TrigFlow F.

    With σ = σ_d·tan t and x_σ = x_t/cos t (eq. 30) the EDM process is TrigFlow's up to scale, and
    F = (cos t·x_t − D(x_σ, σ))/(σ_d·sin t) (invert f = cos t·x_t − sin t·σ_d·F, eq. 23).
    D receives σ as a tensor of shape [B]. Defined for 0 < t < π/2 only: σ = 0 and σ = ∞ have no
    EDM input, so t must stay inside the open interval (samplers start at t_max = arctan(80/σ_d); the training
    proposal never reaches either end). The wrapper does not read t's values (it runs inside training steps,
    where that would stall a GPU): at t = 0 or π/2 its output is not finite.
    """
    check_positive("sigma_d", sigma_d)

    def fn(x_scaled: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        check_t(t, x_scaled)
        x_t = sigma_d * x_scaled
        tt = expand(t.to(compute_dtype(t)), x_t)
        cos, sin = torch.cos(tt), torch.sin(tt)
        sigma = sigma_d * torch.tan(t)
        D_hat = D((x_t / cos).to(x_scaled.dtype), sigma, **cond)
        return ((cos * x_t - D_hat) / (sigma_d * sin)).to(x_scaled.dtype)

    return fn


def from_flow(v: Callable[..., torch.Tensor], sigma_d: float, *, time_scale: float = 1.0,
              data: str = "own") -> TrigFlowFn:
    """Wrap a rectified-flow velocity v(x_s, s·time_scale, **cond) ≈ E[ε − y | x_s] as a TrigFlow F.

    The flow runs on its data y: x_s = (1 − s)·y + s·ε, ε ~ N(0, I), s ∈ [0, 1], where y = x0 (data="own", the
    default: scm's data is the flow model's own, σ_d its std) or y = x0/σ_d (data="unit": Sana-Sprint's
    convention, the flow model's data at unit std; Chen et al. 2025, Prop. 3.1). With y = x0/k, x_t = a·y + b·ε
    for a = k·cos t, b = σ_d·sin t, so matching signal-to-noise ratios gives
        s = b/(a + b),   x_s = x_t/(a + b),   F = cos t·(x_s + (1 − s)·v) − (k·sin t/σ_d)·(x_s − s·v),
    the TrigFlow target E[cos t·ε − sin t·x0/σ_d | x_t] (eq. 3–4) from ε̂ = x_s + (1 − s)·v and ŷ = x_s − s·v.
    For data="unit" this is Sana-Sprint's F = [(cos t − sin t)·x_t/σ_d + v]/(sin t + cos t). Defined on the
    closed interval [0, π/2]. `time_scale` multiplies the time fed to v (e.g. 1000 for models trained on
    s·1000; beware that a large scale amplifies ∂F/∂t, the instability of paper §4.1). Same conventions as
    `scm.diffusers.from_diffusers` (`scm.diffusers.convert`), which wraps diffusers' flow-matching models.
    """
    check_positive("sigma_d", sigma_d)
    check_positive("time_scale", time_scale)
    check_choice("data", data, ("own", "unit"))
    k = 1.0 if data == "own" else float(sigma_d)

    def fn(x_scaled: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        check_t(t, x_scaled)
        work = compute_dtype(t, x_scaled)
        cos, sin = torch.cos(t.to(work)), torch.sin(t.to(work))
        a, b = k * cos, sigma_d * sin
        s = b / (a + b)
        x_s = sigma_d * x_scaled.to(work) / expand(a + b, x_scaled)
        v_hat = v(x_s.to(x_scaled.dtype), (s * time_scale).to(t.dtype), **cond).to(work)
        ss = expand(s, x_scaled)
        eps, y = x_s + (1 - ss) * v_hat, x_s - ss * v_hat
        F = expand(cos, x_scaled) * eps - (k / sigma_d) * expand(sin, x_scaled) * y
        return F.to(x_scaled.dtype)

    return fn


# -- the teacher a user names ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherSource:
    """A teacher described before anything is loaded. `kind`: "run" (a diffusion run directory: `run_cfg` is its
    configuration, `latent` its data's latent space), "diffusers" (`folder`: `scm.diffusers.teacher.DiffusersFolder`)
    or "factory" ("module:function": nothing is known before it is called)."""

    spec: str
    kind: str
    run_cfg: object = None
    latent: dict | None = None
    folder: object = None

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The shape of one input of its network, (C, H, W); None for a factory."""
        if self.kind == "run":
            return self.run_cfg.shape
        return self.folder.shape if self.kind == "diffusers" else None

    @property
    def classes(self) -> int | None:
        """Its number of classes (0: unconditional); None for a factory."""
        if self.kind == "run":
            return int(self.run_cfg.net.label_dim or 0)
        return (self.folder.classes or 0) if self.kind == "diffusers" else None


def open_teacher(spec: str) -> TeacherSource:
    """The teacher `spec` names (module docstring), from its configuration files; ConfigError (key "teacher") when
    it names none."""
    from scm.runs import RunDir, is_run_dir, read_run_config  # on use: `import scm` stays the maths core

    if spec.startswith(DIFFUSERS_PREFIX):
        from scm.diffusers.teacher import read_diffusers

        return TeacherSource(spec, "diffusers", folder=read_diffusers(spec.removeprefix(DIFFUSERS_PREFIX)))
    if is_run_dir(spec):
        return TeacherSource(spec, "run", run_cfg=read_run_config(spec), latent=RunDir(spec).read_latent())
    if ":" in spec:
        return TeacherSource(spec, "factory")
    raise ConfigError(f"teacher={spec!r}: not a run directory (no config.json), 'diffusers:PATH' nor "
                      "'module:function'", key="teacher")


@dataclass
class LoadedTeacher:
    """A loaded teacher: `fn(x_t/σ_d, t, **cond) -> F`; for a diffusers teacher also `model` (its network, whose
    weights its student starts from) and `scheduler`."""

    source: TeacherSource
    fn: TrigFlowFn
    model: torch.nn.Module | None = None
    scheduler: object = None


def load_teacher(source: TeacherSource, *, ema: float | None = None, sigma_d: float = 0.5, data: str = "own",
                 device="cpu") -> LoadedTeacher:
    """Read a teacher's weights: a run's EMA of σ_rel `ema` (default its first); a diffusers network converted for
    data of std `sigma_d` in the data convention `data` (`scm.diffusers.from_diffusers`); a factory's function."""
    if source.kind == "run":
        from scm.runs import load_run

        return LoadedTeacher(source, load_run(source.spec, ema, device=device).net)
    if source.kind == "diffusers":
        from scm.diffusers.teacher import from_diffusers

        loaded = source.folder.load(device=device)
        fn = from_diffusers(loaded.model, loaded.scheduler, sigma_d=sigma_d, data=data)
        return LoadedTeacher(source, fn, loaded.model, loaded.scheduler)
    return LoadedTeacher(source, load_teacher_factory(source.spec))


def load_teacher_factory(spec: str) -> TrigFlowFn:
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


class HeldTeacher:
    """A teacher network held for sCD with less memory: its weights in `dtype` (bf16/fp16: half of fp32's; each call
    runs under autocast to it and returns the caller's dtype) and, with `offload`, on the CPU between calls (moved to
    `device` for each call, pinned where CUDA is there, and dropped from the device after it: the teacher then costs
    no device memory between calls, for one host-to-device copy of its weights per call). No gradients ever."""

    def __init__(self, fn: TrigFlowFn, module: torch.nn.Module, device, dtype: torch.dtype = torch.float32,
                 offload: bool = False):
        self.fn, self.module, self.device, self.dtype = fn, module, torch.device(device), dtype
        self.takes_guidance = getattr(fn, "takes_guidance", False)
        self.reads_no_class = getattr(fn, "reads_no_class", False)
        module.requires_grad_(False).eval()
        if dtype != torch.float32:
            module.to(dtype=dtype)
        self.offload = offload and self.device.type != "cpu"
        self._host = self._pin() if self.offload else []  # (module, "_parameters" | "_buffers", name, host tensor)

    def _pin(self) -> list[tuple]:
        """The module's tensors, each replaced by a pinned host copy (where CUDA is there): what each call moves."""
        slots = []
        for m in self.module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, v in getattr(m, kind).items():
                    if v is not None:
                        slots.append((m, kind, name, _as(kind, _pinned(v.detach().cpu()))))
        self._put(slots)
        return slots

    @staticmethod
    def _put(slots) -> None:
        for m, kind, name, v in slots:
            getattr(m, kind)[name] = v

    def _on_device(self) -> list[tuple]:
        return [(m, kind, name, _as(kind, v.to(self.device, non_blocking=True))) for m, kind, name, v in self._host]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self._put(self._on_device())  # (nothing without offload)
        try:
            if self.dtype == torch.float32:
                return self.fn(x, t, **cond)
            with torch.autocast(x.device.type, dtype=self.dtype):
                return self.fn(x, t, **cond).to(x.dtype)
        finally:
            self._put(self._host)  # the device copies are dropped


def _pinned(v: torch.Tensor) -> torch.Tensor:
    return v.pin_memory() if torch.cuda.is_available() else v


def _as(kind: str, v: torch.Tensor) -> torch.Tensor:
    """A module slot's value: a frozen Parameter in `_parameters`, the tensor itself in `_buffers`."""
    return torch.nn.Parameter(v, requires_grad=False) if kind == "_parameters" else v
