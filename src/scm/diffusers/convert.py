"""A diffusers model's parameterisation, and its inputs and outputs in TrigFlow terms (Lu & Song 2024, §3, App. B).

One data space for every parameterisation: scm's x0 is the teacher's data y scaled by k,

    x0 = k·y,    k = 1 (data="own", the default: x0 is exactly what the teacher was trained on, pixels or its
                        scaled latents, and σ_d is that data's std)
                 k = σ_d (data="unit", Sana-Sprint's convention: the teacher's data is x0/σ_d, at unit std).

TrigFlow's x_t = cos t·x0 + sin t·σ_d·ε (eq. 2) is then x_t = a·y + b·ε with a = k·cos t, b = σ_d·sin t, so every
Gaussian diffusion of y is the same process up to a time change and a scale. The teacher's noise level is
σ' = b/a = (σ_d/k)·tan t (eq. 30 with σ_d/k in place of σ_d), and:

    VP / DDPM (ε-, v- or x0-prediction):  x_vp = x_t/√(a² + b²) = ᾱ^½·y + (1 − ᾱ)^½·ε with ᾱ = 1/(1 + σ'²);
        the model's timestep is the fractional index i of its discrete schedule where σ_i = √((1 − ᾱ_i)/ᾱ_i)
        equals σ', interpolated linearly in log σ between neighbouring steps (as k-diffusion does); outside
        [σ_0, σ_{T−1}] it is clamped to the end (the input scaling still uses the exact σ').
    EDM / Karras (diffusers' EDM schedulers):  x_σ = x_t/a = y + σ'·ε;  D = c_skip·x_σ + c_out·G(c_in·x_σ, ¼ ln σ')
        with c_in = 1/√(σ'² + σ_e²), c_skip = σ_e²/(σ'² + σ_e²), c_out = ±σ'σ_e/√(σ'² + σ_e²), σ_e the
        scheduler's sigma_data (EDM, Karras et al. 2022, Table 1).
    Rectified flow (FlowMatchEulerDiscreteScheduler):  x_s = x_t/(a + b) = (1 − s)·y + s·ε with s = b/(a + b), the
        model sees s·T (T = num_train_timesteps) and predicts v = ε − y. Its `shift` (and Flux's dynamic shift)
        only chooses which times a sampler visits, not what the model computes at a time, so it plays no part here.

Each case yields the model's ε̂ and ŷ = E[y | x_t]; since the TrigFlow target is F = cos t·ε − sin t·x0/σ_d (eq. 3–4)
and expectations are linear, the teacher's F is exactly

    F = cos t·ε̂ − (k·sin t/σ_d)·ŷ.

Ends: v- and flow-prediction are defined on the closed interval [0, π/2]; ε-prediction has no x0 at t = π/2 and
x0-prediction no ε at t = 0, EDM neither (σ' = 0 or ∞): samplers start at t_max = arctan(80/σ_d) (App. G.2) and
the training proposal never reaches the ends.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from scm._checks import check_choice, check_positive
from scm.errors import ConfigError
from scm.precision import compute_dtype
from scm.trigflow import expand

__all__ = ["DATA_CONVENTIONS", "Parameterization", "call_model", "data_scale", "default_null_label", "num_classes"]

DATA_CONVENTIONS = ("own", "unit")
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def data_scale(data: str, sigma_d: float) -> float:
    """k in x0 = k·y: 1 when scm's data is the teacher's own (data="own"), σ_d when the teacher's data is x0/σ_d
    (data="unit", Sana-Sprint)."""
    check_choice("data", data, DATA_CONVENTIONS)
    check_positive("sigma_d", sigma_d)
    return 1.0 if data == "own" else float(sigma_d)


@functools.lru_cache(maxsize=64)
def constant_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant input (a VP scheduler's σ table, SDXL's time ids, PixArt-α's resolution) made once per (values,
    dtype, device): a new tensor from a Python list on every call would be a host-to-device copy per step (and none
    may happen while a CUDA graph is captured). A normal tensor even when first asked for under inference_mode, so
    that training may use it too; callers only read it (expand, index, never write)."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


@dataclass(frozen=True)
class Parameterization:
    """What a diffusers model computes at a noise level: `kind` ("vp", "edm" or "flow") and `prediction`
    (vp: epsilon | v_prediction | sample; edm: epsilon | v_prediction, diffusers' names for the sign of c_out;
    flow: flow). vp: `log_sigmas[i]` = ln σ_i of the model's timestep i, `time_input` "index" (the fractional
    index) or "c_noise" (¼ ln σ, EulerDiscreteScheduler's timestep_type="continuous"); edm: `sigma_data` = σ_e;
    flow: `num_train_timesteps` = T."""

    kind: str
    prediction: str
    log_sigmas: tuple[float, ...] | None = None
    time_input: str = "index"
    sigma_data: float | None = None
    num_train_timesteps: int = 1000

    def __post_init__(self):
        check_choice("kind", self.kind, ("vp", "edm", "flow"))
        allowed = {"vp": VP_PREDICTIONS, "edm": ("epsilon", "v_prediction"), "flow": ("flow",)}[self.kind]
        check_choice("prediction", self.prediction, allowed)
        if self.kind == "vp" and not self.log_sigmas:
            raise ConfigError("a VP parameterisation needs the schedule's log_sigmas")
        if self.kind == "edm":
            check_positive("sigma_data", self.sigma_data or 0.0)

    @classmethod
    def from_scheduler(cls, scheduler) -> Parameterization:
        """Read the parameterisation from a diffusers scheduler (any class whose config has the usual fields)."""
        name, cfg = type(scheduler).__name__, scheduler.config
        if name in FLOW_SCHEDULERS:
            return cls("flow", "flow", num_train_timesteps=int(cfg.num_train_timesteps))
        prediction = cfg.get("prediction_type", "epsilon")
        if name in EDM_SCHEDULERS:
            return cls("edm", prediction, sigma_data=float(cfg.sigma_data))
        if prediction == "flow_prediction" or cfg.get("use_flow_sigmas"):
            return cls("flow", "flow", num_train_timesteps=int(cfg.num_train_timesteps))
        acp = getattr(scheduler, "alphas_cumprod", None)
        if acp is None:
            raise ConfigError(f"scheduler {name}: no alphas_cumprod, EDM sigma_data or flow-matching config; scm "
                              "reads VP/DDPM, EDM and flow-matching schedulers", key="teacher")
        acp = torch.as_tensor(acp, dtype=torch.float64).clamp(min=2.0**-24)  # zero-SNR schedules end at ᾱ = 0
        log_sigmas = 0.5 * torch.log((1 - acp) / acp)
        time_input = "c_noise" if cfg.get("timestep_type") == "continuous" else "index"
        return cls("vp", prediction, log_sigmas=tuple(log_sigmas.tolist()), time_input=time_input)

    # -- inputs ---------------------------------------------------------------------------------------------------
    def model_inputs(self, x_scaled: torch.Tensor, t: torch.Tensor, sigma_d: float, k: float = 1.0):
        """(x_in, timestep): the model's input for TrigFlow's x_t = σ_d·x_scaled at time t ([B])."""
        work = compute_dtype(t, x_scaled)
        tw = t.to(work)
        a, b = k * torch.cos(tw), sigma_d * torch.sin(tw)
        x_t = sigma_d * x_scaled.to(work)
        if self.kind == "vp":
            x_in = x_t / expand(torch.sqrt(a * a + b * b), x_t)
            timestep = self._vp_time(torch.log(b) - torch.log(a))
        elif self.kind == "edm":
            x_in = x_t / expand(torch.sqrt(b * b + (self.sigma_data * a) ** 2), x_t)
            timestep = 0.25 * (torch.log(b) - torch.log(a))
        else:
            x_in = x_t / expand(a + b, x_t)
            timestep = b / (a + b) * self.num_train_timesteps
        return x_in.to(x_scaled.dtype), timestep

    def _vp_time(self, log_sigma: torch.Tensor) -> torch.Tensor:
        if self.time_input == "c_noise":
            return 0.25 * log_sigma
        table = constant_tensor(self.log_sigmas, log_sigma.dtype, log_sigma.device)
        hi = torch.searchsorted(table, log_sigma.detach().contiguous()).clamp(1, len(table) - 1)
        lo_v, hi_v = table[hi - 1], table[hi]
        index = (hi - 1).to(log_sigma.dtype) + (log_sigma - lo_v) / (hi_v - lo_v)
        return index.clamp(0, len(table) - 1)

    # -- outputs --------------------------------------------------------------------------------------------------
    def trigflow_F(self, out: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor, sigma_d: float,
                   k: float = 1.0) -> torch.Tensor:
        """TrigFlow's F = cos t·ε̂ − (k·sin t/σ_d)·ŷ from the model's output `out` at input `x_in` (module docstring)."""
        work = compute_dtype(t, out)
        tw = t.to(work)
        cos, sin = torch.cos(tw), torch.sin(tw)
        a, b = expand(k * cos, out), expand(sigma_d * sin, out)
        o, x = out.to(work), x_in.to(work)
        if self.kind == "vp":
            c = torch.sqrt(a * a + b * b)
            alpha, sigma = a / c, b / c  # ᾱ^½ and (1 − ᾱ)^½
            if self.prediction == "epsilon":
                eps, y = o, (x - sigma * o) / alpha
            elif self.prediction == "v_prediction":  # v = ᾱ^½·ε − (1 − ᾱ)^½·y
                eps, y = alpha * o + sigma * x, alpha * x - sigma * o
            else:
                eps, y = (x - alpha * o) / sigma, o
        elif self.kind == "edm":
            s_e = self.sigma_data
            sig = b / a
            x_sigma = x * torch.sqrt(sig * sig + s_e * s_e)  # undo c_in
            c_out = sig * s_e / torch.sqrt(sig * sig + s_e * s_e)
            y = s_e**2 / (sig * sig + s_e**2) * x_sigma + (c_out if self.prediction == "epsilon" else -c_out) * o
            eps = (x_sigma - y) / sig
        else:
            s = b / (a + b)
            eps, y = x + (1 - s) * o, x - s * o
        F = expand(cos, out) * eps - (k / sigma_d) * expand(sin, out) * y
        return F.to(out.dtype)

    # -- records --------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        if self.kind == "vp":
            lo, hi = math.exp(self.log_sigmas[0]), math.exp(self.log_sigmas[-1])
            return f"VP {self.prediction}, {len(self.log_sigmas)} steps, σ ∈ [{lo:.3g}, {hi:.3g}]"
        if self.kind == "edm":
            return f"EDM {self.prediction}, σ_data={self.sigma_data}"
        return f"rectified flow, time × {self.num_train_timesteps}"


def call_model(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, *, null_label: int | None = None,
               **cond) -> torch.Tensor:
    """Call a diffusers network on (x, timestep) with scm's conditioning and return its prediction tensor.

    `labels` (scm's name: class indices [B], or None for the unconditional input) becomes `class_labels`; for a
    class-conditional model None becomes `null_label` (DiT's extra "no class" row is found by itself). Prompts
    (`text`, `text_mask`, `text_pooled`) and a guidance scale (`guidance`, for a model with a guidance input) become
    the model's own inputs (`scm.diffusers.families`); every other keyword (encoder_hidden_states, …) passes
    through. A model with learned variance (twice the input's channels, e.g. DiT, PixArt) gives its first half,
    the mean prediction.
    """
    from scm.diffusers.families import family_of

    labels = cond.pop("labels", None)
    if labels is not None and labels.is_floating_point():  # one-hot rows → indices
        labels = labels.argmax(dim=1)
    if num_classes(model) is not None:
        if labels is None:
            null = default_null_label(model) if null_label is None else null_label
            if null is None:
                raise ConfigError(f"{type(model).__name__} is class-conditional without an unconditional class; "
                                  "pass null_label (or labels)", key="teacher")
            labels = torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)
        elif null_label is not None:  # scm's NO_CLASS (< 0) rows of a stacked guided call: the unconditional class
            labels = torch.where(labels < 0, null_label, labels)
    elif labels is not None:
        raise ConfigError(f"{type(model).__name__} is unconditional but labels were given", key="teacher")
    if timestep.ndim == 0:
        timestep = timestep.expand(x.shape[0])
    out = family_of(model, generic=True).call(model, x, timestep.to(x.dtype), labels=labels, **cond)
    if out.shape[1] == 2 * x.shape[1]:
        out = out[:, : x.shape[1]]
    return out


def num_classes(model) -> int | None:
    """The number of classes of a class-conditional diffusers model (the model, or its config); None for an
    unconditional one."""
    cfg = model if isinstance(model, Mapping) else getattr(model, "config", {})
    if cfg.get("num_class_embeds"):  # UNet2DModel, UNet2DConditionModel
        return int(cfg["num_class_embeds"])
    if cfg.get("norm_type") == "ada_norm_zero" and cfg.get("num_embeds_ada_norm"):  # DiT (PixArt's is not classes)
        return int(cfg["num_embeds_ada_norm"])
    return None


def default_null_label(model) -> int | None:
    """The "no class" index of a model trained with label dropout: its label table has one row more than classes."""
    n = num_classes(model)
    for name, module in model.named_modules():
        if name.endswith("class_embedder") or name.endswith("class_embedding"):
            table = getattr(module, "embedding_table", module)
            rows = getattr(table, "num_embeddings", None)
            if rows is not None and n is not None and rows > n:
                return n
    return None
