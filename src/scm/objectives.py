"""Training objectives: the TrigFlow diffusion loss (teachers) and the sCT / sCD consistency loss.

An objective is called as `loss, stats = objective(net, x0, step, generator=..., **cond)`, where
`net(x_t/σ_d, t, **cond)` returns F, or (F, w) when called with `return_weight=True` (w = the adaptive
log-weight w_φ(t) of eq. 8; EDM2 calls −w the "logvar"). `loss` is a scalar to backpropagate; `stats`
holds detached scalars for logging. Objectives know nothing of optimizers, files or devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scm._checks import check_positive, check_same_shape, check_t
from scm._rng import rng_replayer
from scm.tangents import METHODS, jvp_tangent
from scm.teachers import guided
from scm.trigflow import add_noise, expand, sample_t, sct_velocity

__all__ = ["ConsistencyLoss", "DiffusionLoss", "normalize_tangent", "scm_target", "tangent_warmup"]


def scm_target(
    F: torch.Tensor,
    JF: torch.Tensor,
    x_t: torch.Tensor,
    dxdt: torch.Tensor,
    t: torch.Tensor,
    sigma_d: float,
    r: float = 1.0,
) -> torch.Tensor:
    """The unnormalized sCM target g = cos t·df⁻/dt with tangent warmup r (Alg. 1; eq. 6 × cos t):

        g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σ_d·JF),   JF = cos t·sin t·dF⁻/dt.

    The prior weight w(t) = 1/(σ_d tan t) of App. D is already folded in (it turns −σ_d sin t·df/dt into
    −cos t·df/dt). At r = 1 this is exactly cos t·df⁻/dt; at r = 0 it is the velocity-matching term.
    """
    check_same_shape(F=F, JF=JF, x_t=x_t, dxdt=dxdt)
    check_t(t, x_t)
    check_positive("sigma_d", sigma_d)
    work = torch.promote_types(F.dtype, torch.float32)
    tt = expand(t.to(work), F)
    c, s = torch.cos(tt), torch.sin(tt)
    g = -c * c * (sigma_d * F.to(work) - dxdt.to(work)) - r * (c * s * x_t.to(work) + sigma_d * JF.to(work))
    return g.to(F.dtype)


def tangent_warmup(step: float, H: float) -> float:
    """r = min(1, step/H): linear tangent warmup over H (§4.2; H = 10k iterations in the paper). `step` and
    H share a unit: iterations, or kimg (what scm's training loop passes, so the batch size does not matter)."""
    return 1.0 if H <= 0 else min(1.0, max(0.0, step / H))


def normalize_tangent(g: torch.Tensor, c: float, norm: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Tangent normalization g/(‖g‖ + c) per example (§4.2, Fig. 5a); returns (normalized g, ‖g‖ [B]).

    norm="l2" is the paper's full per-example ℓ2 norm; norm="rms" divides it by sqrt(D) (FastGen's
    resolution-invariant variant), which makes c comparatively much larger.
    """
    n = torch.linalg.vector_norm(g.flatten(1).to(_work(g)), dim=1)
    if norm == "rms":
        n = n / math.sqrt(g[0].numel())
    elif norm != "l2":
        raise ValueError(f"tangent norm must be 'l2' or 'rms', got {norm!r}")
    return (g / (expand(n, g) + c).to(g.dtype)), n


def _work(x: torch.Tensor) -> torch.dtype:
    """The loss maths runs in at least float32 (bf16/fp16 network outputs are promoted)."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_example_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def _call_net(net, x_scaled, t, adaptive: bool, cond: dict):
    """Run the network; return (F, w) with w = None when adaptive weighting is off."""
    if not adaptive:
        return net(x_scaled, t, **cond), None
    out = net(x_scaled, t, return_weight=True, **cond)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("adaptive weighting needs net(x, t, return_weight=True) to return (F, w)")
    return out[0], out[1]


def _draw_t_z(x0, P_mean, P_std, sigma_d, generator, t=None, z=None):
    """t from the log-normal proposal and z ~ N(0, σ_d²I), unless given (fixed t or z for tests/ablations)."""
    if t is None:
        dtype = torch.promote_types(x0.dtype, torch.float32)
        t = sample_t(x0.shape[0], P_mean, P_std, sigma_d, generator=generator, device=x0.device, dtype=dtype)
    if z is None:
        z = sigma_d * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, z


def _weighted(per_example: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """e^{w}·L − w (eq. 8, adaptive weighting) or L when w is None."""
    if w is None:
        return per_example
    w = w.reshape(-1).to(per_example.dtype)
    if w.shape != per_example.shape:
        raise ValueError(f"the adaptive weight must have shape {tuple(per_example.shape)}, got {tuple(w.shape)}")
    return torch.exp(w) * per_example - w


@dataclass
class DiffusionLoss:
    """TrigFlow diffusion (v-prediction) loss for teachers (eq. 4/25), EDM2-style adaptive weighting.

        t ~ log-normal proposal (P_mean, P_std);  x_t = cos t·x0 + sin t·z;  v_t = cos t·z − sin t·x0
        L = E[ e^{w_φ(t)}·mean((F_θ(x_t/σ_d, t) − v_t/σ_d)²) − w_φ(t) ]

    A uniform weight on ‖F − v_t/σ_d‖² is EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)² on ‖D − x0‖² (spec §1.2),
    so this is EDM2's loss in TrigFlow variables; w_φ equalises its scale across t.
    """

    sigma_d: float = 0.5
    P_mean: float = -0.8
    P_std: float = 1.6
    adaptive_weight: bool = True

    def __post_init__(self):
        check_positive("sigma_d", self.sigma_d)
        check_positive("P_std", self.P_std)

    def __call__(self, net: Callable, x0: torch.Tensor, step: float = 0, *, generator=None, t=None, z=None, **cond):
        sd = self.sigma_d
        t, z = _draw_t_z(x0, self.P_mean, self.P_std, sd, generator, t, z)
        x_t = add_noise(x0, z, t)                                        # eq. 2
        v_t = sct_velocity(x0, z, t)                                     # target of eq. 4
        F, w = _call_net(net, x_t / sd, t, self.adaptive_weight, cond)
        work = _work(F)
        mse = _per_example_mean((F.to(work) - v_t.to(work) / sd) ** 2)
        loss = _weighted(mse, w).mean()
        stats = {"loss": loss.detach(), "mse": mse.detach().mean()}
        if w is not None:
            stats["weight"] = w.detach().float().mean()
        return loss, stats


@dataclass
class ConsistencyLoss:
    """The continuous-time consistency loss of sCT and sCD (Alg. 1; eq. 6, 8; §4.2, §5.2).

        t ~ log-normal (P_mean, P_std); z ~ N(0, σ_d²I); x_t = cos t·x0 + sin t·z
        dx_t/dt = cos t·z − sin t·x0                                   (sCT)
                = σ_d·F_teacher^s(x_t/σ_d, t),  s ~ U[guidance]        (sCD, CFG teacher at scale s)
        F, JF = F_θ(x_t/σ_d, t), cos t·sin t·dF_θ⁻/dt                   (one JVP pass, §5.1)
        g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·(cos t sin t·x_t + σ_d·JF),  r = min(1, step/H)
        g ← g/(‖g‖ + c)
        L = E[ e^{w_φ(t)}·mean((F_θ − F_θ⁻ − g)²) − w_φ(t) ]           (θ⁻ = stopgrad(θ), not an EMA)

    The loss value is not a quality signal (F_θ − F_θ⁻ = 0 in value): only its gradient matters.

    The open choices of spec §2.7 / §8, decided here (each switchable):
    - extra_sigma_weight=False: no extra 1/σ factor. The paper's prior weight w(t) = 1/(σ_d tan t) is what
      turns −σ_d sin t·df/dt into cos t·df/dt (App. D), so it is already inside g; Sana/FastGen multiply the
      per-example loss by 1/σ once more, which after tangent normalization is not the same objective.
    - tangent_norm="l2": the paper writes ‖g‖ (the full per-example norm, as Sana and rCM use); "rms"
      (FastGen) divides by sqrt(D), making c = 0.1 a much larger relative floor.
    - share_dropout=True: the tangent pass and the training pass draw the same dropout mask (the global
      RNG is rewound between them), so JF is the derivative of the very function whose output F is trained
      and F_θ − F_θ⁻ is exactly zero. The paper is silent; independent masks add variance to g. F⁻ is
      always the detached output of the training pass (as in Sana/FastGen).
    - fused_pass=True: one network pass carries the autograd graph of F and the forward-mode tangent JF (the
      tangent computed from detached values, so it records nothing): about 1.45× a diffusion step for sCT
      on the tiny U-Net instead of 1.8× with a separate no-grad tangent pass and a training forward (False;
      needed where the network's wrappers have no forward-AD rule, e.g. FSDP2). Same result either way.
    """

    sigma_d: float = 0.5
    P_mean: float = -1.0
    P_std: float = 1.4
    teacher: Callable | None = None
    guidance: tuple[float, float] | None = None
    teacher_uncond: dict | None = None
    warmup: float = 10_000  # H, in the units of `step` (the paper: 10k iterations; scm train: kimg)
    tangent_norm_c: float | None = 0.1
    tangent_norm: str = "l2"
    adaptive_weight: bool = True
    extra_sigma_weight: bool = False
    share_dropout: bool = True
    fused_pass: bool = True
    tangent_method: str = "forward_ad"
    tangent_precision: torch.dtype | None = None
    rearranged_jvp: bool = True
    discrete_steps: int | None = None  # N: a discrete-time CM with Δt = (π/2)/N instead of the exact tangent

    def __post_init__(self):
        check_positive("sigma_d", self.sigma_d)
        check_positive("P_std", self.P_std)
        if self.tangent_norm not in ("l2", "rms"):
            raise ValueError(f"tangent_norm must be 'l2' or 'rms', got {self.tangent_norm!r}")
        if self.tangent_norm_c is not None:
            check_positive("tangent_norm_c", self.tangent_norm_c)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if self.discrete_steps is not None and self.discrete_steps < 1:
            raise ValueError(f"discrete_steps must be >= 1, got {self.discrete_steps!r}")
        if self.tangent_method not in METHODS:
            raise ValueError(f"tangent_method must be one of {METHODS}, got {self.tangent_method!r}")
        if self.guidance is not None:
            if self.teacher is None:
                raise ValueError("guidance needs a teacher: classifier-free guidance is for sCD (sCT has no teacher)")
            lo, hi = self.guidance
            if not 0 < lo <= hi:
                raise ValueError(f"guidance must be a range (lo, hi) with 0 < lo <= hi, got {self.guidance!r}")

    @property
    def method(self) -> str:
        return "sct" if self.teacher is None else "scd"

    @torch.no_grad()
    def _velocity(self, x0, z, x_t, t, generator, cond):
        """dx_t/dt and the conditioning the student sees (with the guidance scale s for sCD)."""
        if self.teacher is None:
            return sct_velocity(x0, z, t), cond                                  # sCT (§2.2)
        if self.guidance is None:
            return self.sigma_d * self.teacher(x_t / self.sigma_d, t, **cond), cond  # sCD (App. G.2)
        lo, hi = self.guidance
        s = lo + (hi - lo) * torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        teacher = guided(self.teacher, self.teacher_uncond)
        dxdt = self.sigma_d * teacher(x_t / self.sigma_d, t, guidance=s, **cond)   # §5.2: CFG teacher at s
        return dxdt, {**cond, "guidance": s}

    def __call__(self, net: Callable, x0: torch.Tensor, step: float = 0, *, generator=None, t=None, z=None, **cond):
        sd = self.sigma_d
        t, z = _draw_t_z(x0, self.P_mean, self.P_std, sd, generator, t, z)
        x_t = add_noise(x0, z, t)
        dxdt, cond = self._velocity(x0, z, x_t, t, generator, cond)

        student = functools.partial(net, return_weight=True) if self.adaptive_weight else net
        method, step_dt = self.tangent_method, None
        if self.discrete_steps:
            method, step_dt = "discrete", (math.pi / 2) / self.discrete_steps
        tangent = functools.partial(
            jvp_tangent, student, x_t, t, dxdt, sd, method=method, fd_step=step_dt,
            precision=self.tangent_precision, rearranged=self.rearranged_jvp, **cond,
        )
        if self.fused_pass:
            F, JF, *aux = tangent(primal_grad=True)
            if self.adaptive_weight and not (aux and len(aux[0]) == 1):
                raise TypeError("adaptive weighting needs net(x, t, return_weight=True) to return (F, w)")
            w = aux[0][0] if aux else None
        else:
            rewind = rng_replayer(x0.device) if self.share_dropout else None
            JF = tangent()[1]
            if rewind is not None:
                rewind()
            F, w = _call_net(net, x_t / sd, t, self.adaptive_weight, cond)
        F_minus = F.detach()                                                     # θ⁻ = stopgrad(θ)

        r = tangent_warmup(step, self.warmup)
        g = scm_target(F_minus, JF, x_t, dxdt, t, sd, r)                         # Alg. 1
        if self.tangent_norm_c is not None:                                      # §4.2 (Fig. 5a)
            g, g_norm = normalize_tangent(g, self.tangent_norm_c, self.tangent_norm)
        else:
            g_norm = torch.linalg.vector_norm(g.flatten(1).to(_work(g)), dim=1)
        work = _work(F)
        mse = _per_example_mean((F.to(work) - F_minus.to(work) - g.to(work)) ** 2)
        if self.extra_sigma_weight:                                              # spec §2.7 item 1
            mse = mse / (sd * torch.tan(t.to(work)))
        loss = _weighted(mse, w).mean()                                          # eq. 8
        stats = {"loss": loss.detach(), "g_norm": g_norm.detach().mean(), "r": torch.tensor(r)}
        if w is not None:
            stats["weight"] = w.detach().float().mean()
        return loss, stats
