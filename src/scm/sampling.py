"""Samplers in TrigFlow time, one call shape for all: `sampler(fn, noise, ts, sigma_d, ..., **cond) -> x0`.

- `fn(x_t/σ_d, t, **cond)` returns F (or a tuple whose first element is F).
- `noise` is x at the start time ts[0]: pure noise of std σ_d (σ_d·ε).
- `ts` are the decreasing times at which the network is evaluated, ts[0] = start; all in (0, π/2]. Both
  samplers end at t = 0, which may be written as a trailing 0 or left implicit.

Consistency sampling (§5.1–5.3): x̂0 = f(x, t_0); for i ≥ 1, re-noise x = cos t_i·x̂0 + sin t_i·z_i with fresh
z_i ~ N(0, σ_d²I) and denoise again. One network evaluation per time. Teacher ODE sampling integrates the
PF-ODE dx/dt = σ_d·F (eq. 3): "euler" is the first-order DDIM step of eq. 26 (N evaluations), "heun" is
EDM's second-order Heun method in σ = σ_d·tan t coordinates (2N − 1 evaluations: the last step, to 0, is
first-order; a step that starts at exactly π/2, where σ = ∞, is too).
All samplers run without autograd. Noise comes from `generator`: one torch.Generator, or one per example (then
an example's result does not depend on the batch it is drawn in). The times are Python floats, so the samplers
never read tensor values: nothing in them waits for a GPU.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from scm._checks import HALF_PI, T_TOL, check_float, check_positive
from scm._rng import Generators, randn
from scm.defaults import TEACHER_NFE  # a diffusion teacher's default evaluations: EDM's Heun sampler, 18 steps
from scm.errors import InvalidSetting
from scm.precision import compute_dtype
from scm.trigflow import add_noise, ddim_step, denoise, t_max_default

__all__ = ["TEACHER_NFE", "T_MID", "check_t_mid", "consistency_sample", "consistency_steps", "consistency_times",
           "ode_sample", "ode_times", "renoise_draws"]

T_MID = 1.1  # the paper's fixed intermediate time for 2-step sampling (§5.2)


def check_t_mid(t_mid, t_max: float = HALF_PI) -> float:
    """The intermediate time of multi-step consistency sampling (§5.2) as a float: a number in (0, t_max), the
    one definition of its range (a run's `t_mid`, samplers, pipelines); InvalidSetting (key "t_mid") otherwise."""
    if not (isinstance(t_mid, (int, float)) and not isinstance(t_mid, bool) and math.isfinite(t_mid)
            and 0 < t_mid < t_max):
        raise InvalidSetting("t_mid", t_mid, f"must lie in (0, t_max = {t_max:.4f}) radians (the paper's is {T_MID})")
    return float(t_mid)


def consistency_times(steps: int, *, sigma_d: float = 0.5, t_max: float | None = None, t_mid: float = T_MID):
    """Default times for `steps`-step consistency sampling.

    1 step: [t_max]; 2 steps: [t_max, t_mid] (the paper's t_max = arctan(80/σ_d), t_mid = 1.1);
    N > 2 steps (not specified by the paper; our choice): t_max, then N − 1 times evenly spaced from t_mid
    down to t_mid/(N − 1), e.g. 4 steps → [1.5645, 1.1, 0.733, 0.367].
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t_max = t_max_default(sigma_d) if t_max is None else t_max
    if not 0 < t_max <= HALF_PI + T_TOL:
        raise InvalidSetting("t_max", t_max, "must lie in (0, π/2] radians")
    check_t_mid(t_mid, t_max)
    t_max = min(t_max, HALF_PI)
    if steps == 1:
        return [t_max]
    return [t_max] + [t_mid * (1 - i / (steps - 1)) for i in range(steps - 1)]  # t_mid itself exactly


def ode_times(
    steps: int, *, sigma_d: float = 0.5, sigma_max: float = 80.0, sigma_min: float = 0.002, rho: float = 7.0
) -> list[float]:
    """EDM's time steps (Karras et al. 2022, eq. 5) mapped to TrigFlow: σ_i from σ_max to σ_min with ρ = 7,
    t_i = arctan(σ_i/σ_d). With `steps` = 18 the Heun sampler uses 35 evaluations, with 32 it uses 63."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    check_positive("sigma_min", sigma_min)
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if steps == 1:
        return [math.atan(sigma_max / sigma_d)]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)]
    return [math.atan(s / sigma_d) for s in sigmas]


def check_times(ts: Sequence[float] | torch.Tensor) -> list[float]:
    """Validate ts; return it with a trailing 0 removed and times up to π/2 + 1e-5 clamped to π/2 (diffusers'
    SCMScheduler stores π/2 as 1.57080)."""
    if isinstance(ts, torch.Tensor):
        if ts.ndim != 1:
            raise ValueError(f"ts must be a 1-D sequence of times, got shape {tuple(ts.shape)}")
        ts = ts.tolist()
    ts = [float(x) for x in ts]
    if ts and ts[-1] == 0.0:
        ts = ts[:-1]
    if not ts:
        raise ValueError("ts must hold at least one time in (0, π/2]")
    for i, x in enumerate(ts):
        if not (0 < x <= HALF_PI + T_TOL):
            raise ValueError(f"ts[{i}] = {x!r} is outside (0, π/2] (only a trailing 0 is allowed)")
    ts = [min(x, HALF_PI) for x in ts]
    for i in range(1, len(ts)):
        if not ts[i] < ts[i - 1]:
            raise ValueError(f"ts must be strictly decreasing, but ts[{i - 1}] = {ts[i - 1]!r} <= ts[{i}] = {ts[i]!r}")
    return ts


def _evaluate(fn: Callable, x: torch.Tensor, t: float, sigma_d: float, cond: dict):
    """F at (x/σ_d, t) with t broadcast to [B]; returns (F, t as a [B] tensor)."""
    tb = torch.full((x.shape[0],), t, device=x.device, dtype=compute_dtype(x))
    out = fn(x / sigma_d, tb, **cond)
    F = out[0] if isinstance(out, (tuple, list)) else out
    if F.shape != x.shape:
        raise ValueError(f"fn returned F of shape {tuple(F.shape)} for x of shape {tuple(x.shape)}")
    return F, tb


def _check_noise(noise: torch.Tensor, sigma_d: float) -> None:
    check_float("noise", noise)
    check_positive("sigma_d", sigma_d)
    if noise.ndim < 1 or noise.shape[0] == 0:
        raise ValueError(f"noise must have shape [B, ...] with B >= 1, got {tuple(noise.shape)}")


@torch.no_grad()
def consistency_sample(
    fn: Callable,
    noise: torch.Tensor,
    ts: Sequence[float] | torch.Tensor,
    sigma_d: float,
    generator: Generators = None,
    **cond,
) -> torch.Tensor:
    """Multistep consistency sampling (§5.3): len(ts) evaluations; fresh noise from `generator` (one
    torch.Generator, or one per example), drawn before the first evaluation (`renoise_draws`: the same numbers
    as drawing each step's when it comes, since nothing else draws from the generators)."""
    _check_noise(noise, sigma_d)
    ts = check_times(ts)
    renoise = renoise_draws(noise, len(ts) - 1, sigma_d, generator)
    return consistency_steps(fn, noise, renoise, ts, sigma_d, **cond)


def renoise_draws(noise: torch.Tensor, count: int, sigma_d: float, generator: Generators = None) -> list[torch.Tensor]:
    """The re-noising noise z = σ_d·n of multistep consistency sampling's `count` later steps, in order."""
    return [sigma_d * randn(noise.shape, generator, device=noise.device, dtype=noise.dtype) for _ in range(count)]


def consistency_steps(fn: Callable, noise: torch.Tensor, renoise: Sequence[torch.Tensor], ts: Sequence[float],
                      sigma_d: float, **cond) -> torch.Tensor:
    """The steps of multistep consistency sampling (§5.3) with their noise given (`renoise`: one tensor per step
    after the first): a function of tensors alone, which `torch.compile` captures whole (`scm.generate`'s captured
    sampler). `ts` are checked times (`check_times`)."""
    F, tb = _evaluate(fn, noise, ts[0], sigma_d, cond)
    x0 = denoise(noise, F, tb, sigma_d)  # f = cos t·x_t − sin t·σ_d·F (eq. 5)
    for t, z in zip(ts[1:], renoise, strict=True):  # re-noise the estimate to time t_i, denoise again (§5.2-5.3)
        x = add_noise(x0, z, tb.new_full(tb.shape, t))
        F, tb = _evaluate(fn, x, t, sigma_d, cond)
        x0 = denoise(x, F, tb, sigma_d)
    return x0


@torch.no_grad()
def ode_sample(
    fn: Callable,
    noise: torch.Tensor,
    ts: Sequence[float] | torch.Tensor,
    sigma_d: float,
    solver: str = "euler",
    **cond,
) -> torch.Tensor:
    """Integrate the PF-ODE dx/dt = σ_d·F from ts[0] to 0 with the "euler" (DDIM) or "heun" solver."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    _check_noise(noise, sigma_d)
    grid = [*check_times(ts), 0.0]
    x = noise
    for t_cur, t_next in itertools.pairwise(grid):
        F, tb = _evaluate(fn, x, t_cur, sigma_d, cond)
        tn = tb.new_full(tb.shape, t_next)
        x_next = ddim_step(x, F, tb, tn, sigma_d)  # eq. 26; also EDM's Euler step in σ coordinates
        if solver == "heun" and t_next > 0 and t_cur < HALF_PI:
            F_next, _ = _evaluate(fn, x_next, t_next, sigma_d, cond)
            x_next = _heun_correct(x, x_next, F, F_next, t_cur, t_next, sigma_d)
        x = x_next
    return x


def _heun_correct(x, x_pred, F, F_pred, t_cur: float, t_next: float, sigma_d: float) -> torch.Tensor:
    """EDM's Heun corrector in (σ, x_σ = x/cos t) coordinates, where the PF-ODE reads dx_σ/dσ = ε̂ with
    ε̂ = (sin t·x + cos t·σ_d·F)/σ_d, the noise prediction; x_pred is the predictor's (DDIM) result."""
    work = compute_dtype(x)
    c0, s0, c1, s1 = math.cos(t_cur), math.sin(t_cur), math.cos(t_next), math.sin(t_next)
    eps0 = (s0 * x.to(work) + c0 * sigma_d * F.to(work)) / sigma_d
    eps1 = (s1 * x_pred.to(work) + c1 * sigma_d * F_pred.to(work)) / sigma_d
    d_sigma = sigma_d * (math.tan(t_next) - math.tan(t_cur))
    x_sigma = x.to(work) / c0 + d_sigma * 0.5 * (eps0 + eps1)
    return (c1 * x_sigma).to(x.dtype)
