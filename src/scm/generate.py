"""Generating images from a trained run: consistency sampling for sCT/sCD runs, the PF-ODE for diffusion runs.

One entry point, `generate(run, n, ...)`, used by `scm sample`, `scm eval`, the demo and the benchmarks. Noise
for batch i comes from a generator seeded with (seed, i), so the output is a function of the seed and the
batch size. Returns images in the data's model space ([-1, 1] for pixels) and the generation time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from scm.runs import LoadedRun
from scm.sampling import check_times, consistency_sample, consistency_times, ode_sample, ode_times
from scm.train.batches import mix_seed

__all__ = ["Sampler", "generate"]


class SamplerError(ValueError):
    pass


@dataclass
class Sampler:
    """How to sample: `steps` (or explicit `ts`) for consistency runs; `nfe` and `solver` for diffusion runs."""

    steps: int | None = None
    ts: tuple[float, ...] | None = None
    nfe: int | None = None
    solver: str = "heun"

    def times(self, run: LoadedRun) -> list[float]:
        if self.ts is not None:
            try:
                check_times(self.ts)
            except ValueError as e:
                raise SamplerError(f"--ts: {e}") from None
        sd = run.cfg.loss.sigma_d
        if run.cfg.method == "diffusion":
            if self.steps is not None and self.nfe is None and self.ts is None:
                raise SamplerError("this is a diffusion run: give --nfe (and --solver), not --steps")
            if self.ts is not None:
                return list(self.ts)
            nfe = self.nfe or 35
            if self.solver == "heun":
                if nfe < 1 or nfe % 2 == 0:
                    raise SamplerError(f"--nfe {nfe}: Heun uses 2N − 1 evaluations, so the NFE must be odd")
                return ode_times((nfe + 1) // 2, sigma_d=sd)
            if nfe < 1:
                raise SamplerError(f"--nfe must be >= 1, got {nfe}")
            return ode_times(nfe, sigma_d=sd)
        if self.nfe is not None:
            raise SamplerError(f"this is a {run.cfg.method} run: give --steps (1, 2, …) or --ts, not --nfe")
        if self.ts is not None:
            return list(self.ts)
        steps = 1 if self.steps is None else self.steps
        if steps < 1:
            raise SamplerError(f"--steps must be >= 1, got {steps}")
        return consistency_times(steps, sigma_d=sd)

    def evaluations(self, run: LoadedRun) -> int:
        n = len(self.times(run))
        return 2 * n - 1 if run.cfg.method == "diffusion" and self.solver == "heun" else n

    def describe(self, run: LoadedRun) -> str:
        if run.cfg.method == "diffusion":
            return f"{self.solver} ODE, {self.evaluations(run)} NFE"
        return f"{len(self.times(run))}-step consistency"


def conditioning(run: LoadedRun, n: int, class_label: int | None, guidance: float | None, device) -> dict:
    cfg = run.cfg.net
    cond = {}
    if cfg.label_dim:
        if class_label is not None and not 0 <= class_label < cfg.label_dim:
            raise SamplerError(f"--class {class_label}: this model has classes 0..{cfg.label_dim - 1}")
        cond["labels"] = (torch.full((n,), class_label, device=device) if class_label is not None
                          else torch.arange(n, device=device) % cfg.label_dim)
    elif class_label is not None:
        raise SamplerError("--class: this model is unconditional")
    if guidance is not None:
        if not cfg.guidance_embed and run.cfg.method != "diffusion":
            raise SamplerError("--guidance: this model has no guidance input")
        if run.cfg.method == "diffusion" and not cfg.label_dim:
            raise SamplerError("--guidance: classifier-free guidance needs a class-conditional model")
        cond["guidance"] = float(guidance)
    elif cfg.guidance_embed and run.cfg.loss.guidance:
        cond["guidance"] = float(run.cfg.loss.guidance[0])
    return cond


@torch.no_grad()
def generate(run: LoadedRun, n: int, sampler: Sampler, *, batch: int = 256, seed: int = 0, class_label=None,
             guidance=None, device=None, progress: bool = True) -> tuple[torch.Tensor, float]:
    """n images [n, C, H, W] and the seconds spent generating them."""
    if n < 1 or batch < 1:
        raise SamplerError(f"need n >= 1 and batch >= 1, got n={n}, batch={batch}")
    cfg = run.cfg
    device = device or next(run.net.parameters()).device
    net = run.net.to(device)
    ts = sampler.times(run)
    sd = cfg.loss.sigma_d
    fn = net
    if cfg.method == "diffusion" and guidance is not None:
        from scm.teachers import guided

        fn = guided(net)
    shape = (cfg.channels, cfg.resolution, cfg.resolution)
    out, elapsed = [], 0.0
    bar = tqdm(total=n, desc=sampler.describe(run), unit="img", disable=not progress, leave=False)
    for i, start in enumerate(range(0, n, batch)):
        m = min(batch, n - start)
        g = torch.Generator(device).manual_seed(mix_seed(seed, i))
        noise = sd * torch.randn(m, *shape, generator=g, device=device)
        cond = conditioning(run, m, class_label, guidance, device)
        if "labels" in cond and class_label is None:
            cond["labels"] = (torch.arange(start, start + m, device=device)) % cfg.net.label_dim
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if cfg.method == "diffusion":
            x = ode_sample(fn, noise, ts, sd, solver=sampler.solver, **cond)
        else:
            x = consistency_sample(net, noise, ts, sd, generator=g, **cond)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        out.append(x.cpu())
        bar.update(m)
    bar.close()
    return torch.cat(out), elapsed
