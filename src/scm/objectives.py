"""Training objectives: the TrigFlow diffusion loss (teachers) and the sCT / sCD consistency loss.

An objective is called as `loss, stats = objective(net, x0, progress_kimg, generator=..., **cond)`, where
`net(x_t/σ_d, t, **cond)` returns F, or (F, w) when called with `return_weight=True` (w = the adaptive
log-weight w_φ(t) of eq. 8; EDM2 calls −w the "logvar") and `progress_kimg` is the training progress in
thousands of images (it drives the tangent warm-up). `loss` is a scalar to backpropagate; `stats` holds detached
scalar tensors for logging. Objectives know nothing of optimizers, files or devices, and never read tensor
values (no host-device synchronisation), except a caller's own `t`, which is checked once on entry.

An objective's fields are its settings, all plain values: a run's configuration holds the objective's fields
as they are (`scm.config`), and the objective validates them itself (`validate()`), once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import InitVar, dataclass

import torch

from scm._checks import check_choice, check_finite, check_positive, check_same_shape, check_t, checked_t
from scm._rng import rng_replayer
from scm.conditioning import guided
from scm.errors import InvalidSetting
from scm.precision import PRECISIONS, compute_dtype, precision_dtype
from scm.tangents import METHODS, jvp_tangent
from scm.trigflow import add_noise, denoise, expand, sample_t, sct_velocity, t_max_default

__all__ = ["OBJECTIVES", "ConsistencyLoss", "DiffusionLoss", "normalize_tangent", "scm_target", "tangent_warmup",
           "vsd_direction"]

TANGENT_NORMS = ("l2", "rms")


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
    work = compute_dtype(F)
    tt = expand(t.to(work), F)
    c, s = torch.cos(tt), torch.sin(tt)
    g = -c * c * (sigma_d * F.to(work) - dxdt.to(work)) - r * (c * s * x_t.to(work) + sigma_d * JF.to(work))
    return g.to(F.dtype)


def tangent_warmup(progress: float, H: float) -> float:
    """r = min(1, progress/H): linear tangent warm-up over H (§4.2; H = 10k iterations in the paper). `progress`
    and H share a unit (the objectives use kimg, so that the batch size does not change the schedule)."""
    return 1.0 if H <= 0 else min(1.0, max(0.0, progress / H))


def normalize_tangent(g: torch.Tensor, c: float, norm: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Tangent normalization g/(‖g‖ + c) per example (§4.2, Fig. 5a); returns (normalized g, ‖g‖ [B]).

    norm="l2" is the paper's full per-example ℓ2 norm; norm="rms" divides it by sqrt(D) (FastGen's
    resolution-invariant variant), which makes c comparatively much larger.
    """
    check_choice("norm", norm, TANGENT_NORMS)
    n = torch.linalg.vector_norm(g.flatten(1).to(compute_dtype(g)), dim=1)
    if norm == "rms":
        n = n / math.sqrt(g[0].numel())
    return (g / (expand(n, g) + c).to(g.dtype)), n


def vsd_direction(x_t: torch.Tensor, F_fake: torch.Tensor, F_real: torch.Tensor, t: torch.Tensor,
                  sigma_d: float) -> torch.Tensor:
    """The variational score distillation direction at a noised generator sample x_t (§6, "sCD + VSD"; DMD):

        d = x̂0_fake − x̂0_real,   x̂0 = cos t·x_t − sin t·σ_d·F   (eq. 23)

    ∇_x KL(p_θ,t ‖ p_data,t) = s_fake − s_real = cos t·(x̂0_fake − x̂0_real)/(σ_d² sin²t) (Tweedie), so a generator
    sample moved along −d lowers the reverse KL at t; the per-example scale is set by the caller
    (`ConsistencyLoss._vsd`: DMD's normalization).
    """
    return denoise(x_t, F_fake, t, sigma_d) - denoise(x_t, F_real, t, sigma_d)


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
    """t from the log-normal proposal and z ~ N(0, σ_d²I), unless given (fixed t or z for tests/ablations; a
    given t is checked here, once: values in [0, π/2], which reads them)."""
    if t is None:
        t = sample_t(x0.shape[0], P_mean, P_std, sigma_d, generator=generator, device=x0.device,
                     dtype=compute_dtype(x0))
    else:
        t = checked_t(t, x0)
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

    A uniform weight on ‖F − v_t/σ_d‖² is EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)² on ‖D − x0‖² (paper App. B),
    so this is EDM2's loss in TrigFlow variables; w_φ equalises its scale across t.
    """

    sigma_d: float = 0.5
    P_mean: float = -0.8
    P_std: float = 1.6
    adaptive_weight: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every setting (InvalidSetting names the field)."""
        check_positive("sigma_d", self.sigma_d)
        check_finite("P_mean", self.P_mean)
        check_positive("P_std", self.P_std)

    def __call__(self, net: Callable, x0: torch.Tensor, progress_kimg: float = 0.0, *, generator=None, t=None,
                 z=None, **cond):
        sd = self.sigma_d
        t, z = _draw_t_z(x0, self.P_mean, self.P_std, sd, generator, t, z)
        x_t = add_noise(x0, z, t)                                        # eq. 2
        v_t = sct_velocity(x0, z, t)                                     # target of eq. 4
        F, w = _call_net(net, x_t / sd, t, self.adaptive_weight, cond)
        work = compute_dtype(F)
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
        g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·(cos t sin t·x_t + σ_d·JF),  r = min(1, progress_kimg/warmup_kimg)
        g ← g/(‖g‖ + c)
        L = E[ e^{w_φ(t)}·mean((F_θ − F_θ⁻ − g)²) − w_φ(t) ]           (θ⁻ = stopgrad(θ), not an EMA)

    The loss value is not a quality signal (F_θ − F_θ⁻ = 0 in value): only its gradient matters.
    `teacher` (sCD; None for sCT) and `teacher_uncond` (the unconditional inputs of a guided teacher: its run's
    `scm.conditioning.Conditioning.null()`, {"labels": None} for class labels) are objects, not settings: they are
    constructor arguments but not fields.

    The choices the paper leaves open, decided here (each switchable):
    - extra_sigma_weight=False: no extra 1/σ factor. The paper's prior weight w(t) = 1/(σ_d tan t) is what
      turns −σ_d sin t·df/dt into cos t·df/dt (App. D), so it is already inside g; Sana-Sprint and NVlabs
      FastGen multiply the per-example loss by 1/σ once more, which after tangent normalization is not the same
      objective.
    - tangent_norm="l2": the paper writes ‖g‖ (the full per-example norm, as Sana-Sprint and rCM use); "rms"
      (FastGen) divides by sqrt(D), making c = 0.1 a much larger relative floor.
    - share_dropout=True: the tangent pass and the training pass draw the same dropout mask (the global
      RNG is rewound between them), so JF is the derivative of the very function whose output F is trained
      and F_θ − F_θ⁻ is exactly zero. The paper is silent; independent masks add variance to g. F⁻ is
      always the detached output of the training pass.
    - fused_pass (None = True): one network pass carries the autograd graph of F and the forward-mode tangent
      JF (the tangent computed from detached values, so it records nothing): 1.5–1.65× a diffusion step for
      sCT on the tiny U-Net (two CPUs) instead of 1.6–1.7× with a separate no-grad tangent pass and a training
      forward (False; needed where the network's wrappers have no forward-AD rule, e.g. FSDP2, for which
      `scm.train` turns None into False). Same result either way (benchmarks/results/step_cost.md).
    - cfg_one_call=True: a guided teacher's conditional and unconditional evaluations run as one call on the batch
      stacked with itself where the inputs stack (prompts, class labels; `scm.conditioning.guided`): fewer launches
      and weight reads, at twice the teacher's no-grad activation peak (False: two calls). Same values up to the
      order of sums.
    - vsd_weight > 0 (sCD + VSD, §6): the loss adds λ·L_VSD of the student's one-step samples and the diffusion
      loss of a critic network passed as `critic=` (the fake score), which it trains too (`_vsd` gives the terms),
      from vsd_start_kimg on (the paper's short phase after sCD, in the same run: optimizer and EMA continue).
      The paper's adaptive weighting of L_VSD is not specified where we follow it: the VSD direction is normalized
      per example as DMD does.
    - warmup_kimg: the paper's H = 10k iterations is given in iterations; here it is in kimg of training, so
      that it does not depend on the batch size. The default, 5120 kimg, is 10k iterations at the paper's
      CIFAR-10 batch of 512.
    """

    sigma_d: float = 0.5
    P_mean: float = -1.0
    P_std: float = 1.4
    guidance: tuple[float, float] | None = None      # sCD: the teacher's CFG scale s ~ U[lo, hi], fed to the student
    warmup_kimg: float = 5120.0                      # tangent warm-up H (§4.2), in kimg
    tangent_norm_c: float | None = 0.1               # c of g/(‖g‖ + c); None: no tangent normalization
    tangent_norm: str = "l2"                         # "l2" (paper) | "rms"
    adaptive_weight: bool = True                     # w_φ(t) of eq. 8
    extra_sigma_weight: bool = False                 # the extra 1/σ factor of Sana-Sprint / FastGen (see above)
    share_dropout: bool = True
    fused_pass: bool | None = None                   # None: fused (True)
    cfg_one_call: bool = True                        # sCD: the CFG teacher's two evaluations as one call
    tangent_method: str = "forward_ad"               # "forward_ad" | "func" | "finite_difference" (scm.tangents)
    tangent_precision: str | None = None             # None: the caller's autocast; "fp32" | "bf16" | "fp16"
    rearranged_jvp: bool = True                      # §5.1's rearranged tangent (False: an ablation)
    discrete_steps: int | None = None                # ablation: a discrete-time CM with Δt = (π/2)/N (§4.2, Fig. 5)
    vsd_weight: float = 0.0                          # λ of sCD + VSD (§6; 0: off): needs sCD and a critic network
    vsd_start_kimg: float = 0.0                      # … from this point of training on (before: sCD alone, critic idle)
    vsd_P_mean: float = 0.4                          # the proposal of t for L_VSD (App. G: (0.4, 2.0) on IN512)
    vsd_P_std: float = 2.0
    critic_P_mean: float = -0.8                      # … and for the critic's diffusion loss L_Diff(φ) ((−0.8, 1.6))
    critic_P_std: float = 1.6
    teacher: InitVar[Callable | None] = None
    teacher_uncond: InitVar[dict | None] = None

    def __post_init__(self, teacher, teacher_uncond):
        self.teacher, self.teacher_uncond = teacher, teacher_uncond
        self.validate()
        if self.guidance is not None and teacher is not None and teacher_uncond is None:
            raise InvalidSetting("teacher_uncond", None, "a guided teacher needs its unconditional input (the run's "
                                 "Conditioning.null(), e.g. {'labels': None})")

    def validate(self) -> None:
        """Check every setting (InvalidSetting names the field)."""
        check_positive("sigma_d", self.sigma_d)
        check_finite("P_mean", self.P_mean)
        check_positive("P_std", self.P_std)
        if self.guidance is not None:
            ok = len(self.guidance) == 2 and all(isinstance(v, (int, float)) for v in self.guidance)
            if not (ok and 0 < self.guidance[0] <= self.guidance[1] and math.isfinite(self.guidance[1])):
                raise InvalidSetting("guidance", self.guidance, "must be a range (lo, hi) with 0 < lo <= hi")
        if not (isinstance(self.warmup_kimg, (int, float)) and math.isfinite(self.warmup_kimg)
                and self.warmup_kimg >= 0):
            raise InvalidSetting("warmup_kimg", self.warmup_kimg, "must be >= 0")
        if self.tangent_norm_c is not None:
            check_positive("tangent_norm_c", self.tangent_norm_c)
        check_choice("tangent_norm", self.tangent_norm, TANGENT_NORMS)
        check_choice("tangent_method", self.tangent_method, METHODS[:-1])  # "discrete" is set by discrete_steps
        check_choice("tangent_precision", self.tangent_precision, (None, *PRECISIONS))
        if self.discrete_steps is not None and not (isinstance(self.discrete_steps, int) and self.discrete_steps >= 1):
            raise InvalidSetting("discrete_steps", self.discrete_steps, "must be an int >= 1")
        if not (isinstance(self.vsd_weight, (int, float)) and math.isfinite(self.vsd_weight) and self.vsd_weight >= 0):
            raise InvalidSetting("vsd_weight", self.vsd_weight, "must be >= 0 (0: no VSD)")
        if not (isinstance(self.vsd_start_kimg, (int, float)) and math.isfinite(self.vsd_start_kimg)
                and self.vsd_start_kimg >= 0):
            raise InvalidSetting("vsd_start_kimg", self.vsd_start_kimg, "must be >= 0")
        for name in ("vsd_P_mean", "critic_P_mean"):
            check_finite(name, getattr(self, name))
        for name in ("vsd_P_std", "critic_P_std"):
            check_positive(name, getattr(self, name))

    @property
    def method(self) -> str:
        return "sct" if self.teacher is None else "scd"

    @property
    def trains_critic(self) -> bool:
        """sCD + VSD: the objective is called with a critic network (the fake score φ), which it also trains."""
        return self.vsd_weight > 0

    @torch.no_grad()
    def _velocity(self, x0, z, x_t, t, generator, cond):
        """dx_t/dt and the conditioning the student sees (with the guidance scale s for sCD)."""
        if self.teacher is None:
            for name in ("guidance", "vsd_weight"):  # checked here, not in validate(): a configuration has no teacher
                if getattr(self, name):
                    raise InvalidSetting(name, getattr(self, name), "needs a teacher: it is for sCD only")
            return sct_velocity(x0, z, t), cond                                  # sCT (§2.2)
        if self.guidance is None:
            return self.sigma_d * self._teacher_F(x_t, t, cond), cond            # sCD (App. G.2)
        lo, hi = self.guidance
        s = lo + (hi - lo) * torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        return self.sigma_d * self._teacher_F(x_t, t, cond, s), {**cond, "guidance": s}

    def _teacher_F(self, x_t, t, cond, s=None):
        """The teacher's F at x_t: conditional, or (§5.2) its CFG at scale s [B]; a guidance-distilled teacher
        (Flux-dev) takes s as an input instead. `cond` holds no guidance scale."""
        if s is None:
            return self.teacher(x_t / self.sigma_d, t, **cond)
        teacher = self.teacher if getattr(self.teacher, "takes_guidance", False) else guided(
            self.teacher, self.teacher_uncond, one_call=self.cfg_one_call)
        return teacher(x_t / self.sigma_d, t, guidance=s, **cond)

    def __call__(self, net: Callable, x0: torch.Tensor, progress_kimg: float = 0.0, *, generator=None, t=None,
                 z=None, critic: Callable | None = None, **cond):
        if self.trains_critic and critic is None:
            raise TypeError("vsd_weight > 0: the objective needs its critic network (critic=...), which it trains too")
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
            precision=precision_dtype(self.tangent_precision), rearranged=self.rearranged_jvp, **cond,
        )
        if self.fused_pass is not False:
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

        r = tangent_warmup(progress_kimg, self.warmup_kimg)
        g = scm_target(F_minus, JF, x_t, dxdt, t, sd, r)                         # Alg. 1
        if self.tangent_norm_c is not None:                                      # §4.2 (Fig. 5a)
            g, g_norm = normalize_tangent(g, self.tangent_norm_c, self.tangent_norm)
        else:
            g_norm = torch.linalg.vector_norm(g.flatten(1).to(compute_dtype(g)), dim=1)
        work = compute_dtype(F)
        mse = _per_example_mean((F.to(work) - F_minus.to(work) - g.to(work)) ** 2)
        if self.extra_sigma_weight:                                              # Sana-Sprint / FastGen's 1/σ
            mse = mse / (sd * torch.tan(t.to(work)))
        loss = _weighted(mse, w).mean()                                          # eq. 8
        stats = {"g_norm": g_norm.detach().mean(), "r": torch.full((), r, device=loss.device)}
        if w is not None:
            stats["weight"] = w.detach().float().mean()
        if self.trains_critic and progress_kimg >= self.vsd_start_kimg:          # sCD + VSD (§6)
            vsd, critic_loss, vsd_stats = self._vsd(net, critic, x0, cond, generator)
            loss = loss + self.vsd_weight * vsd + critic_loss
            stats.update(vsd_stats)
        return loss, {"loss": loss.detach(), **stats}

    def _vsd(self, net, critic, x0, cond, generator):
        """sCD + VSD (§6): the VSD loss of the student's one-step samples and the critic's diffusion loss on them.

            x_g = f_θ(z, t_max) = −σ_d·F_θ(z/σ_d, t_max)       (the one-step sample; z ~ N(0, σ_d²I))
            t' ~ log-normal (vsd_P_mean, vsd_P_std);  x_t' = cos t'·sg(x_g) + sin t'·z'
            d = vsd_direction(x_t', F_φ, F_teacher^s) / mean|x_g − x̂0_teacher|   (per example: DMD's normalization)
            L_VSD = mean((x_g − sg(x_g − d))²)                   (its gradient with respect to x_g is 2d/D)
            L_Diff(φ) = the diffusion loss of the critic φ on sg(x_g) (critic_P_mean, critic_P_std)

        The critic (the fake score, initialized as the teacher) sees the student's conditioning, guidance scale
        included; the teacher runs at that scale s (its CFG, as for dx_t/dt). The two losses touch disjoint
        parameters (φ is evaluated without gradients in L_VSD; x_g is detached in L_Diff), so one backward pass
        serves both updates. L_VSD is a mean over the D dimensions, as the other losses are; vsd_weight sets its
        share against the sCD term, whose size depends on the adaptive weight (benchmarks/results/text-vsd.md)."""
        sd, s = self.sigma_d, cond.get("guidance")
        plain = {k: v for k, v in cond.items() if k != "guidance"}
        t_g = torch.full((x0.shape[0],), t_max_default(sd), device=x0.device, dtype=compute_dtype(x0))
        z = sd * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_g = denoise(z, net(z / sd, t_g, **cond), t_g, sd)
        sample = x_g.detach()
        t, noise = _draw_t_z(sample, self.vsd_P_mean, self.vsd_P_std, sd, generator)
        x_t = add_noise(sample, noise, t)
        with torch.no_grad():
            F_real = self._teacher_F(x_t, t, plain, s)  # s: None for an unguided teacher
            F_fake = critic(x_t / sd, t, **cond)
            work = compute_dtype(x_g)
            scale = _per_example_mean((sample - denoise(x_t, F_real, t, sd)).abs().to(work)).clamp_min(1e-5)
            d = vsd_direction(x_t, F_fake, F_real, t, sd).to(work) / expand(scale, sample)
            d_norm = torch.linalg.vector_norm(d.flatten(1), dim=1)
        vsd = _per_example_mean((x_g.to(work) - (sample - d).to(work)) ** 2).mean()
        critic_loss, critic_stats = DiffusionLoss(sd, self.critic_P_mean, self.critic_P_std, self.adaptive_weight)(
            critic, sample, generator=generator, **cond)
        return vsd, critic_loss, {"vsd_norm": d_norm.mean(), "critic_loss": critic_stats["loss"]}


# The objective of each training method; a run's configuration holds the instance's fields.
OBJECTIVES: dict[str, type] = {"diffusion": DiffusionLoss, "sct": ConsistencyLoss, "scd": ConsistencyLoss}
