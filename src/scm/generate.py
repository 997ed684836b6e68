"""Generating images from a trained run: consistency sampling for sCT/sCD runs, the PF-ODE for diffusion runs.

One entry point, `generate(run, n, sampler, ...)`, used by `scm sample`, `scm eval`, training's sample grids, the
demo and the benchmarks. Image i's noise comes from its own generator seeded with (seed, i), and its class label
(when the model is conditional) is i mod the number of classes unless one is asked for, so an image depends on
(seed, i) only, never on the batch size or on n (EDM2's per-image seeds); what a run is conditioned on, and the
guidance it takes by default, is its `scm.conditioning.Conditioning`. Everything is validated before any network
runs.

A run on latents (`LoadedRun.latent`, from RUN/latent.json) is decoded here, batch by batch, through the VAE its
data were encoded with (`scm.data.latents.decode`): this is the one place where samples leave latent space, so
`scm sample`, `scm eval` and training's grids all get images.

`captured=True` runs a consistency run's sampler and network as one compiled graph (`torch.compile` of
`scm.sampling.consistency_steps`, with the re-noising noise drawn beforehand from each image's generator, so the
images are those of the eager sampler up to the compiler's floating-point reordering): CUDA graphs on a GPU (mode
"reduce-overhead": the Python launch overhead of a batch-1 sample disappears), one traced graph of PyTorch's own
kernels elsewhere (exactly the eager images on the CPU). A
graph is compiled once per (network, batch shape, steps, dtype) and reused; the first batch pays for it. Diffusion
runs (the PF-ODE) are not captured.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from scm._rng import randn
from scm.conditioning import Conditioning, guidance_as_input
from scm.errors import InvalidSetting, SamplerError
from scm.runs import LoadedRun, mix_seed
from scm.sampling import (
    T_MID,
    TEACHER_NFE,
    check_t_mid,
    check_times,
    consistency_sample,
    consistency_steps,
    consistency_times,
    ode_sample,
    ode_times,
    renoise_draws,
)

__all__ = ["Sampler", "generate", "generate_items", "image_generator", "image_generators", "sample_shape"]

SOLVERS = ("heun", "euler")


@dataclass
class Sampler:
    """How to sample: `steps` (or explicit times `ts`) for consistency runs; `nfe` (or `ts`) and `solver` for
    diffusion runs. Defaults: 1 step; `TEACHER_NFE` (35) with Heun. `t_mid`: the intermediate time of multi-step
    consistency sampling, instead of the run's own (its config's `t_mid`, the paper's 1.1 unless set)."""

    steps: int | None = None
    ts: tuple[float, ...] | None = None
    nfe: int | None = None
    solver: str = "heun"
    t_mid: float | None = None

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise SamplerError(f"solver={self.solver!r}: use heun or euler", key="solver")
        for key in ("steps", "nfe"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise SamplerError(f"{key}={value!r}: must be an integer >= 1", key=key)
        if self.ts is not None:
            try:
                check_times(self.ts)
            except ValueError as e:
                raise SamplerError(f"ts={self.ts}: {e}", key="ts") from None
        if self.t_mid is not None:
            if self.ts is not None:
                raise SamplerError("t_mid: give either explicit times or t_mid, not both", key="t_mid")
            try:
                check_t_mid(self.t_mid)
            except InvalidSetting as e:
                raise SamplerError(str(e), key="t_mid") from None

    def times(self, run: LoadedRun) -> list[float]:
        """The network-evaluation times for this run (validated against the run's kind)."""
        method, sd = run.cfg.method, run.cfg.loss.sigma_d
        if self.ts is not None:
            return check_times(self.ts)
        if method == "diffusion":
            if self.t_mid is not None:
                raise SamplerError("t_mid is a time of consistency sampling; this is a diffusion run", key="t_mid")
            if self.steps is not None and self.nfe is None:
                raise SamplerError("this is a diffusion run: sample it with a number of evaluations (NFE) and a "
                                   "solver, not consistency steps", key="steps")
            nfe = self.nfe or TEACHER_NFE
            if self.solver == "heun":
                if nfe % 2 == 0:
                    raise SamplerError(f"nfe={nfe}: Heun uses 2N − 1 evaluations, so the NFE must be odd", key="nfe")
                return ode_times((nfe + 1) // 2, sigma_d=sd)
            return ode_times(nfe, sigma_d=sd)
        if self.nfe is not None:
            raise SamplerError(f"this is a {method} run: sample it with consistency steps (1, 2, …) or times, "
                               "not an NFE", key="nfe")
        try:
            return consistency_times(self.steps or 1, sigma_d=sd, t_mid=self.mid(run))
        except InvalidSetting as e:
            raise SamplerError(str(e), key=e.key) from None

    def mid(self, run: LoadedRun) -> float:
        """The intermediate time of this run's multi-step consistency sampling: `t_mid`, or the run's own."""
        return float(self.t_mid if self.t_mid is not None else run.cfg.t_mid)

    def evaluations(self, run: LoadedRun) -> int:
        n = len(self.times(run))
        return 2 * n - 1 if run.cfg.method == "diffusion" and self.solver == "heun" else n

    def describe(self, run: LoadedRun) -> str:
        """E.g. "2-step consistency" (with ", t_mid = 1.3" where it is not the paper's), "heun ODE, 35 NFE"."""
        times = "" if self.ts is None else ", t = " + ", ".join(f"{t:.4g}" for t in self.ts)
        if run.cfg.method == "diffusion":
            return f"{self.solver} ODE, {self.evaluations(run)} NFE{times}"
        steps = len(self.times(run))
        if self.ts is None and steps > 1 and self.mid(run) != T_MID:
            times = f", t_mid = {self.mid(run):g}"
        return f"{steps}-step consistency{times}"


def image_generator(seed: int, index: int, device) -> torch.Generator:
    """The generator of image `index` of a request with `seed` (EDM2's per-image seeds): its noise, and its
    re-noising in multi-step sampling, depend on (seed, index) alone, never on the batch it is drawn in."""
    return torch.Generator(device).manual_seed(mix_seed(seed, index))


def image_generators(seed: int, start: int, count: int, device) -> list[torch.Generator]:
    """The generators of images start … start + count − 1 (`image_generator`)."""
    return [image_generator(seed, i, device) for i in range(start, start + count)]


def sample_shape(run: LoadedRun, decode: bool = True) -> tuple[int, ...]:
    """(C, H, W) of what `generate` returns: the data's shape, or for a run on latents (with `decode`) the
    shape of the images they were encoded from."""
    if decode and run.latent is not None:
        from scm.data.latents import image_shape

        return image_shape(run.latent)
    return run.cfg.shape


@functools.cache
def _captured_steps(device_type: str):
    """`consistency_steps` compiled for one kind of device: inductor's kernels replayed as CUDA graphs on a GPU;
    elsewhere traced once into one graph run by PyTorch's own kernels ("aot_eager"), which keeps the eager
    arithmetic exactly (inductor's CPU kernels were measured 10 % off on the small outputs of a fresh network)."""
    if device_type == "cuda":
        return torch.compile(consistency_steps, mode="reduce-overhead", dynamic=False)
    return torch.compile(consistency_steps, backend="aot_eager", dynamic=False)


# Graphs one captured sampler may hold: one per (batch shape, steps, dtype); `scm serve` alone makes up to 7 batch
# shapes × 3 step counts. Past dynamo's default of 8 a new shape would silently run eagerly.
_CAPTURED_GRAPHS = 64


def _room_for_graphs():
    """Dynamo's recompile limit raised to _CAPTURED_GRAPHS for one captured call (named cache_size_limit before
    torch 2.6)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), _CAPTURED_GRAPHS)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a deliberate host-device synchronisation: timing


class _Batches:
    """What `generate` and `generate_items` share: the checks, the network as sampled (guided by CFG for a
    class-conditional diffusion run: `Conditioning.network`), the VAE of a run on latents, and one batch of images
    from their generators and conditioning."""

    def __init__(self, run: LoadedRun, sampler: Sampler, device, decode: bool, class_labels=None, guidance=None,
                 captured: bool = False, prompts=None):
        self.run, self.sampler, self.captured = run, sampler, captured and run.cfg.method != "diffusion"
        self.ts = sampler.times(run)
        self.conditioning = Conditioning.of_run(run.cfg)
        self.conditioning.check(class_labels, guidance, prompts)
        self.device = torch.device(device) if device is not None else next(run.net.parameters()).device
        # CFG's two evaluations in one call: on CUDA always; on the CPU up to 64 stacked rows, past which two
        # calls measured as fast or faster (`scm.conditioning.guided`)
        stack = None if self.device.type == "cuda" else 64
        self.fn = self.conditioning.network(run.net.to(self.device), max_stacked=stack)
        self.latent, self.vae = (run.latent if decode else None), None
        if self.latent is not None:  # the VAE is loaded (and its absence reported) before any network runs
            from scm.data.latents import decoder

            self.vae = decoder(self.latent)
        self.elapsed = 0.0

    def __call__(self, gens: list[torch.Generator], cond: dict) -> torch.Tensor:
        cfg, device = self.run.cfg, self.device
        sd = cfg.loss.sigma_d
        noise = sd * randn((len(gens), *cfg.shape), gens, device=device)
        _sync(device)
        t0 = time.perf_counter()
        if cfg.method == "diffusion":
            x = ode_sample(self.fn, noise, self.ts, sd, solver=self.sampler.solver, **cond)
        elif self.captured:  # (a CUDA graph's output is overwritten by its next replay: cloned)
            renoise = renoise_draws(noise, len(self.ts) - 1, sd, gens)
            cond = guidance_as_input(cond, len(gens), device)
            with _room_for_graphs():
                x = _captured_steps(device.type)(self.fn, noise, renoise, self.ts, sd, **cond).clone()
        else:
            x = consistency_sample(self.fn, noise, self.ts, sd, generator=gens, **cond)
        _sync(device)
        self.elapsed += time.perf_counter() - t0
        if self.latent is not None:
            from scm.data.latents import decode as decode_latents

            x = decode_latents(x, self.latent, self.vae)
        return x.cpu()  # a device-to-host copy per batch (a synchronisation)


@torch.no_grad()
def generate(run: LoadedRun, n: int, sampler: Sampler, *, batch: int = 256, seed: int = 0,
             class_label: int | None = None, guidance: float | None = None, device=None,
             progress: bool = True, decode: bool = True, captured: bool = False,
             prompt: str | Sequence[str] | None = None) -> tuple[torch.Tensor, float]:
    """n images [n, C, H, W] in the data's model space ([-1, 1] for pixels) and the seconds spent generating
    them (network and sampler only, no transfers). For a run on latents the samples are decoded to images in
    [-1, 1] (`sample_shape`), unless `decode=False`; decoding is not counted in the seconds. `captured`: one
    compiled graph per batch shape (module docstring). `prompt` (a text run): one for all images, or a list of
    which image i takes prompt i mod its length."""
    if not (isinstance(n, int) and n >= 1):
        raise SamplerError(f"n={n!r}: need at least one image", key="n")
    if not (isinstance(batch, int) and batch >= 1):
        raise SamplerError(f"batch={batch!r}: must be >= 1", key="batch")
    many = isinstance(prompt, (list, tuple))
    images = _Batches(run, sampler, device, decode, class_label, guidance, captured, prompt)
    out = []
    bar = tqdm(total=n, desc=sampler.describe(run), unit="img", disable=not progress, leave=False)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        index = torch.arange(start, start + m, device=images.device)
        prompts = [prompt[i % len(prompt)] for i in range(start, start + m)] if many else prompt
        cond = images.conditioning.sample_inputs(index, class_label, guidance, prompts)
        out.append(images(image_generators(seed, start, m, images.device), cond))
        bar.update(m)
    bar.close()
    return torch.cat(out), images.elapsed


@torch.no_grad()
def generate_items(run: LoadedRun, sampler: Sampler, items: list[tuple], *, guidance: float | None = None,
                   device=None, decode: bool = True, captured: bool = False) -> tuple[torch.Tensor, float]:
    """The images (seed, i, class_label) — (seed, i, class_label, prompt) for a text run — of `items` in one batch:
    each equal to image i of `generate(seed=seed, class_label=class_label, prompt=prompt)` (up to the batch's
    floating-point differences), so that requests with different seeds, classes and prompts can share a network
    call (`scm serve`). Returns the images and the seconds, as `generate` (`captured` too)."""
    if not items:
        raise SamplerError("items: need at least one image", key="n")
    labels = [item[2] for item in items]
    prompts = [item[3] for item in items] if all(len(item) > 3 and item[3] is not None for item in items) else None
    images = _Batches(run, sampler, device, decode, labels, guidance, captured, prompts=prompts)
    gens = [image_generator(item[0], item[1], images.device) for item in items]
    index = torch.tensor([item[1] for item in items], device=images.device)
    return images(gens, images.conditioning.sample_inputs(index, labels, guidance, prompts)), images.elapsed
