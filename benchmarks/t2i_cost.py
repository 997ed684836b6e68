"""Cost of sCM on diffusers' text-to-image networks, per family: PixArt-Σ, SD3, Flux-dev, Sana and SDXL's U-Net,
each distilled into a student of its own architecture (`scm.diffusers.student_from_diffusers`, guidance input on).

    python benchmarks/t2i_cost.py [--size tiny|real] [--families pixart,sd3,flux,sana,sdxl] [--repeats N]
                                  [--device cpu|cuda] [--precision fp32|bf16] [--budget-s S] [--total-budget-s S]
                                  [--threads N] [--dry-run] [--shrink] [--out DIR]

Per family, with random weights (the cost does not depend on them) and random prompt embeddings of the family's
width and length (padded at random lengths where its pipeline passes a padding mask: PixArt, Sana; every token
real for SD3, Flux and SDXL, as their pipelines and `scm.diffusers.pipeline_text` give them):

- **tangent pass / forward**: the student's forward + JVP (`scm.tangents.jvp_tangent`, forward_ad, as sCD's tangent
  pass runs it, through scm's exact attention) over a plain no-grad forward of the student, same batch and inputs;
  the teacher's forward is timed beside them (student / teacher forward: the cost of scm's wrapper and attention);
- **sCD step / teacher forward**: one training step (`scm.objectives.ConsistencyLoss` with the teacher, guidance
  s ~ U[1, 3] fed to the student's guidance input; objective, backward and, where the family has one, an Adam
  update, as `scm.train` runs it) over one no-grad forward of the teacher at the same batch. The step's teacher is
  guided by CFG, two evaluations (the prompt's and the empty prompt's, stacked into one call of twice the batch:
  `loss.cfg_one_call`), except Flux-dev, which takes the scale as an input (one evaluation): the JSON records
  `teacher_evals_per_step`;
- **peak memory** per case, measured fresh for each (on CUDA `torch.cuda.max_memory_allocated` after
  `reset_peak_memory_stats`, absolute and above what was allocated before the case; on the CPU the growth of the
  process's peak RSS over one call: VmHWM reset through /proc/self/clear_refs, free heap handed back with
  malloc_trim first, so it is the case's own working memory above the models and optimizer state). Adam's moments
  are made before the step's cases, so they count as resident; the step's figure above it holds its activations,
  gradients and transients;
- **1- and 2-step sampling latency** of the student (`scm.sampling.consistency_sample` at t_max, then t_mid = 1.1),
  denoiser only: no text encoding, no VAE decoding.

Timings are medians (min–max) over --repeats round-robin calls after --warmup calls (the last warm-up call is the
one whose memory is measured).

Sizes:
- `tiny` (default; CPU, fp32): small random configurations of each class (two blocks of width 64, 4×32×32 latents,
  24-token prompts of width 64, pooled width 32). A run with --repeats 3 takes a few minutes on two cores.
- `real` (a GPU, bf16 autocast): the published configurations, **reconstructed from the config.json files of
  stabilityai/stable-diffusion-3-medium, black-forest-labs/FLUX.1-dev, Efficient-Large-Model/Sana_1600M_1024px,
  PixArt-alpha/PixArt-Sigma-XL-2-1024-MS and stabilityai/stable-diffusion-xl-base-1.0 as recalled, not read
  from them** (the parameter counts of --dry-run match the published sizes), at 1024² (latents 128×128×16 for
  SD3 and Flux, 32×32×32 for Sana's DC-AE, 128×128×4 for PixArt and SDXL) and the pipelines' prompt lengths
  (SD3 333 = 77 CLIP + 256 T5, Flux 512, Sana 300, PixArt 300, SDXL 77). Models are built directly on the GPU
  (`torch.device`), the teacher with bf16 weights, the student with float32 master weights, except Flux-dev
  (11.9B): a bf16 student with per-block activation checkpointing (hence the separate tangent pass) and no
  optimizer state (forward + backward only), since float32 weights, gradients and Adam moments of 11.9B
  parameters need 190 GB. The step tries batch 4, then 2, then 1 (Flux 2, then 1) and records what ran out of
  memory. --budget-s bounds each family's time and --total-budget-s the run's: past either, the remaining cases
  (and families) are skipped and recorded; results are written after every family. Defaults
  (2 repeats, 1 warm-up, 75 s per family, no case started after 420 s) are meant to keep the five families within
  one device call of under 8 minutes on an H100/H200, model building and Triton's compiling included (an estimate
  from FLOP counts: no GPU was at hand when this was written).
- `--dry-run`: builds each configuration of --size on the meta device only (no memory, no weights), checks its
  student configuration, counts the parameters of teacher and student, estimates the weight and optimizer memory
  of the step, and runs one teacher forward on meta tensors (shapes) at the prompt length.
- `--shrink` (to check the real mode's code path on a CPU): the real configurations cut to one block per stack
  and latents of 1/8 the side, at the real widths, head sizes and prompt lengths.

Writes benchmarks/results/t2i_cost-<size>[-dry-run].{json,md}; the real size's timings go to
benchmarks/results/gpu/t2i_cost-real.{json,md} (or --out). The CPU figures were made with --threads 1: on a shared
two-core machine PyTorch's two OpenMP threads stall on each other under other load.

On a lent GPU (diffusers is not in the device image: carry it, pure Python, in the git-ignored .gpu-data/):
    here:   mkdir -p .gpu-data/site && cp -r .venv/lib/python3.11/site-packages/diffusers{,-0.42.1.dist-info} \
                .gpu-data/site/ && find .gpu-data/site -name __pycache__ -prune -exec rm -rf {} +
    device: run(command='export PYTHONPATH=$PWD/.gpu-data/site:$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1;
                python3 benchmarks/t2i_cost.py --size real --out "$OUT"', carry=[".gpu-data"], timeout_s=570)
    then copy the returned t2i_cost-real.{json,md} into benchmarks/results/gpu/.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from common import RESULTS, machine, time_interleaved, write_results

from scm.app.report import Report
from scm.diffusers import from_diffusers, student_from_diffusers
from scm.diffusers.families import family_of
from scm.diffusers.net import DiffusersNet, student_config
from scm.objectives import ConsistencyLoss
from scm.precision import PRECISIONS
from scm.sampling import consistency_sample, consistency_times
from scm.tangents import jvp_tangent

SIGMA_D = 1.0                # the std of the teachers' scaled latents (any value costs the same)
GUIDANCE = (1.0, 3.0)        # sCD: the teacher's guidance scale s ~ U[1, 3], fed to the student
SAMPLE_GUIDANCE = 2.0        # the student's guidance input in the forward, tangent and sampling cases
FAMILIES = ("pixart", "sd3", "flux", "sana", "sdxl")


@dataclass(frozen=True)
class Spec:
    """One family at one size: the diffusers class and config, its training scheduler, latents and prompt."""

    title: str
    model_class: str
    config: dict
    scheduler: str                      # a key of `scheduler`
    shape: tuple[int, int, int]         # latents (C, H, W)
    tokens: int                         # prompt tokens
    padded: bool                        # its pipeline passes a padding mask (prompts padded at random lengths)
    expected_params: float | None = None  # the published size (real configurations), for the dry run's check
    step_batches: tuple[int, ...] = (4, 2, 1)
    student_dtype: torch.dtype = torch.float32
    checkpointing: bool = False
    optimizer: bool = True
    notes: list = field(default_factory=list)


def scheduler(kind: str):
    """The family's training scheduler (it decides the parameterisation: VP ε, or rectified flow)."""
    import diffusers

    if kind == "flow":  # SD3, Flux
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    if kind == "sana":
        return diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=3.0)
    if kind == "pixart":  # VP ε, linear betas
        return diffusers.DPMSolverMultistepScheduler()
    return diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_specs() -> dict[str, Spec]:
    """Small random configurations of each class (the shapes of tests/test_diffusers_t2i.py, wider)."""
    w, p, shape, tokens = 64, 32, (4, 32, 32), 24
    return {
        "pixart": Spec("PixArt-Σ (tiny)", "PixArtTransformer2DModel", dict(
            num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=32,
            patch_size=2, cross_attention_dim=64, caption_channels=w, use_additional_conditions=False,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6), "pixart", shape, tokens, True),
        "sd3": Spec("SD3 (tiny)", "SD3Transformer2DModel", dict(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=w, caption_projection_dim=64, pooled_projection_dim=p, out_channels=4,
            pos_embed_max_size=32), "flow", shape, tokens, False),
        "flux": Spec("Flux-dev (tiny)", "FluxTransformer2DModel", dict(
            patch_size=1, in_channels=4 * shape[0], num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=w, pooled_projection_dim=p, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)), "flow", shape, tokens, False),
        "sana": Spec("Sana (tiny)", "SanaTransformer2DModel", dict(
            in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=64, caption_channels=w,
            mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False,
            norm_eps=1e-6), "sana", shape, tokens, True),
        "sdxl": Spec("SDXL U-Net (tiny)", "UNet2DConditionModel", dict(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            transformer_layers_per_block=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=w, attention_head_dim=(2, 4),
            norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=p + 6 * 8, use_linear_projection=True), "sdxl", shape, 24, False),
    }


def real_specs() -> dict[str, Spec]:
    """The published configurations, reconstructed (module docstring), at 1024² and the pipelines' prompts."""
    flux_notes = ["bf16 student weights and gradients, per-block checkpointing (separate tangent pass), no optimizer "
                  "state: fp32 weights + gradients + Adam moments of 11.9B parameters are 190 GB"]
    return {
        "pixart": Spec("PixArt-Σ XL/2 1024", "PixArtTransformer2DModel", dict(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            dropout=0.0, norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=128,
            patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
            use_additional_conditions=False, caption_channels=4096, attention_type="default"),
            "pixart", (4, 128, 128), 300, True, 0.61e9),
        "sd3": Spec("SD3-medium", "SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
            "flow", (16, 128, 128), 333, False, 2.03e9),
        "flux": Spec("Flux-dev", "FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)), "flow", (16, 128, 128), 512, False, 11.9e9, step_batches=(2, 1),
            student_dtype=torch.bfloat16, checkpointing=True, optimizer=False, notes=flux_notes),
        "sana": Spec("Sana 1.6B 1024", "SanaTransformer2DModel", dict(
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
            num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
            caption_channels=2304, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=32, patch_size=1,
            norm_elementwise_affine=False, norm_eps=1e-6), "sana", (32, 32, 32), 300, True, 1.60e9),
        "sdxl": Spec("SDXL base U-Net", "UNet2DConditionModel", dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
            act_fn="silu", upcast_attention=False), "sdxl", (4, 128, 128), 77, False, 2.57e9),
    }


def shrunk(spec: Spec) -> Spec:
    """A real configuration cut to one block per stack and 1/8 of the latents' side (--shrink)."""
    cut = {"num_layers": 1, "num_single_layers": 1, "layers_per_block": 1}
    config = {k: cut.get(k, v) for k, v in spec.config.items()}
    if "transformer_layers_per_block" in config:
        config["transformer_layers_per_block"] = (1,) * len(config["transformer_layers_per_block"])
    c, h, w = spec.shape
    if not family_of(spec.model_class).any_size:  # the U-Net takes its sample_size alone
        config["sample_size"] = h // 8
    return replace(spec, title=f"{spec.title} (1 block, 1/8 side)", config=config, shape=(c, h // 8, w // 8),
                   expected_params=None)


# -- building ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(spec: Spec):
    import diffusers

    return getattr(diffusers, spec.model_class)(**spec.config)


def widths(spec: Spec) -> tuple[int, int]:
    """(D, P): the prompt tokens' width and the pooled embedding's (0: none)."""
    return family_of(spec.model_class).widths(spec.config)


def prompts(spec: Spec, batch: int, device, seed: int = 1) -> dict:
    """Random prompt inputs: tokens [B, T, D] and mask (random lengths in [T/4, T] where the family is padded, all
    real tokens otherwise), and the pooled embedding where the family takes one."""
    d, p = widths(spec)
    g = torch.Generator().manual_seed(seed)
    t = spec.tokens
    lengths = (torch.randint(max(1, t // 4), t + 1, (batch,), generator=g) if spec.padded
               else torch.full((batch,), t))
    cond = {"text": torch.randn(batch, t, d, generator=g), "text_mask": torch.arange(t)[None] < lengths[:, None]}
    if p:
        cond["text_pooled"] = torch.randn(batch, p, generator=g)
    return {k: v.to(device) for k, v in cond.items()}


def null_prompt(spec: Spec, device) -> dict:
    """The empty prompt (one row, broadcast by the CFG teacher): one real token where the family is padded."""
    cond = prompts(spec, 1, device, seed=2)
    if spec.padded:
        cond["text_mask"] = (torch.arange(spec.tokens) < 1)[None].to(device)
    return cond


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Bench:
    """A family built for measurement: the teacher's model and TrigFlow fn, the student, its inputs' settings."""

    spec: Spec
    device: torch.device
    half: torch.dtype | None            # autocast dtype (None: fp32)
    model: torch.nn.Module
    teacher: object
    net: DiffusersNet
    null: dict

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.half, enabled=self.half is not None)


def build(spec: Spec, device: torch.device, half: torch.dtype | None) -> Bench:
    """Teacher (bf16 weights under bf16 autocast, else fp32) and student, built on `device` directly."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(half or torch.float32):
        model = build_model(spec).eval().requires_grad_(False)
    sched = scheduler(spec.scheduler)
    with torch.device(device), default_dtype(spec.student_dtype if half else torch.float32):
        net = student_from_diffusers(model, sched, sigma_d=SIGMA_D, guidance_embed=True, shape=spec.shape,
                                     checkpointing=spec.checkpointing)
    for head in (net.weight_embed, net.weight_linear, net.guidance_embed, net.guidance_linear):
        if head is not None:  # scm's small heads (w_φ, the guidance embedding) stay float32
            head.float()
    return Bench(spec, device, half, model, from_diffusers(model, sched, sigma_d=SIGMA_D), net,
                 null_prompt(spec, device))


# -- measuring -----------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def memory_start(device: torch.device) -> int | None:
    """Start a fresh peak: bytes in use now (CUDA: allocated; CPU: resident, after returning free heap)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def memory_peak(device: torch.device, before: int | None) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / 2**20, "above_mib": (peak - before) / 2**20}
    if before is None:
        return {"peak_mib": None, "above_mib": None}
    peak = _status_kb("VmHWM") * 1024
    return {"peak_mib": peak / 2**20, "above_mib": (peak - before) / 2**20}


def measure(fns: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """Each fn warmed up (its last warm-up call measured for peak memory), then timed round-robin."""
    memory = {}
    for name, fn in fns.items():
        for _ in range(warmup - 1):
            fn()
        before = memory_start(device)
        fn()
        memory[name] = memory_peak(device, before)
    rows = time_interleaved(fns, device, repeats, warmup=0)
    for name, row in rows.items():
        row.update(memory[name])
    return rows


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _inputs(b: Bench, batch: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = SIGMA_D * torch.randn(batch, *b.spec.shape, generator=g)
    t = torch.rand(batch, generator=g) * 1.5 + 0.03
    return x.to(b.device), t.to(b.device), torch.randn(x.shape, generator=g).to(b.device)


def tangent_case(b: Bench, args) -> dict:
    """Student forward (no grad) vs forward + JVP (the tangent pass), same batch and inputs; and the teacher's
    forward, the same network without scm's wrapper (its exact attention: on the CPU the blocked math path in
    inference too, on CUDA PyTorch's fused kernels as in the teacher)."""
    x_t, t, dxdt = _inputs(b, args.batch)
    cond = {**prompts(b.spec, args.batch, b.device), "guidance": torch.full((args.batch,), SAMPLE_GUIDANCE,
                                                                             device=b.device)}
    b.net.eval()

    def forward():
        with torch.no_grad(), b.autocast():
            b.net(x_t / SIGMA_D, t, **cond)

    def tangent():
        with b.autocast():
            jvp_tangent(b.net, x_t, t, dxdt, SIGMA_D, method="forward_ad", **cond)

    def teacher():  # the same network unwrapped (diffusers' attention), one unguided evaluation
        own = {"guidance": cond["guidance"]} if b.teacher.takes_guidance else {}
        with torch.no_grad(), b.autocast():
            b.teacher(x_t / SIGMA_D, t, **{k: v for k, v in cond.items() if k != "guidance"}, **own)

    rows = measure({"teacher forward": teacher, "student forward": forward, "forward + JVP": tangent}, b.device,
                   args.repeats, args.warmup)
    fwd, jvp, tea = rows["student forward"], rows["forward + JVP"], rows["teacher forward"]
    return {"batch": args.batch, "timings": rows, "ratio": jvp["median_ms"] / fwd["median_ms"],
            "ratio_minima": jvp["min_ms"] / fwd["min_ms"], "student_over_teacher": fwd["median_ms"] / tea["median_ms"]}


def make_step(b: Bench, batch: int):
    """One sCD training step at `batch`, and one teacher forward at the same batch (module docstring)."""
    spec = b.spec
    objective = ConsistencyLoss(sigma_d=SIGMA_D, guidance=GUIDANCE, warmup_kimg=0, fused_pass=not spec.checkpointing,
                                teacher=b.teacher, teacher_uncond=b.null)
    opt = (torch.optim.Adam(b.net.parameters(), lr=1e-6, fused=b.device.type == "cuda") if spec.optimizer
           else None)
    if opt is not None:  # Adam's moments made now (a zero gradient moves nothing): resident, not the step's peak
        for p in b.net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        b.net.zero_grad(set_to_none=True)
    x0, t, _ = _inputs(b, batch, seed=1)
    cond = prompts(b.spec, batch, b.device, seed=3)
    own = {"guidance": torch.full((batch,), sum(GUIDANCE) / 2, device=b.device)} if b.teacher.takes_guidance else {}

    def step():
        with b.autocast():
            loss, _ = objective(b.net, x0, 100.0, generator=torch.Generator(b.device).manual_seed(0), **cond)
        loss.backward()
        if opt is not None:
            opt.step()
        b.net.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad(), b.autocast():
            b.teacher(x0 / SIGMA_D, t, **cond, **own)

    return {"teacher forward": teacher_forward, "sCD step": step}


def step_case(b: Bench, args) -> dict:
    """The step at the first batch of the family's list that fits in memory (CUDA), with the teacher forward."""
    b.net.train()
    out_of_memory = []
    for batch in args.step_batches or b.spec.step_batches:
        try:
            rows = measure(make_step(b, batch), b.device, args.repeats, args.warmup)
        except torch.cuda.OutOfMemoryError as e:
            out_of_memory.append({"batch": batch, "error": str(e).splitlines()[0][:200]})
            print(f"  step at batch {batch}: out of memory", flush=True)
            rows = None
        b.net.zero_grad(set_to_none=True)
        free(b.device)
        if rows is not None:
            step, teacher = rows["sCD step"], rows["teacher forward"]
            evals = 1 if b.teacher.takes_guidance else 2
            return {"batch": batch, "timings": rows, "ratio": step["median_ms"] / teacher["median_ms"],
                    "ratio_minima": step["min_ms"] / teacher["min_ms"], "teacher_evals_per_step": evals,
                    "fused_pass": not b.spec.checkpointing, "optimizer": "Adam" if b.spec.optimizer else "none",
                    "out_of_memory": out_of_memory}
    return {"batch": None, "out_of_memory": out_of_memory}


def latency_case(b: Bench, args, batch: int) -> dict:
    """1- and 2-step consistency sampling of the student at `batch` (denoiser only)."""
    b.net.eval()
    noise = SIGMA_D * torch.randn(batch, *b.spec.shape, generator=torch.Generator().manual_seed(4)).to(b.device)
    cond = prompts(b.spec, batch, b.device, seed=5)

    def sampler(steps: int):
        times = consistency_times(steps, sigma_d=SIGMA_D)

        def run():
            with b.autocast():
                consistency_sample(b.net, noise, times, SIGMA_D, guidance=SAMPLE_GUIDANCE, **cond)
        return run

    rows = measure({"1-step": sampler(1), "2-step": sampler(2)}, b.device, args.repeats, args.warmup)
    for row in rows.values():
        row["ms_per_image"] = row["median_ms"] / batch
    return {"batch": batch, "timings": rows}


def describe(spec: Spec, model=None, net=None) -> dict:
    d, p = widths(spec)
    out = {"title": spec.title, "model_class": spec.model_class, "latents": list(spec.shape), "tokens": spec.tokens,
           "padding_mask": spec.padded, "text_width": d, "pooled_width": p, "scheduler": spec.scheduler,
           "student_dtype": str(spec.student_dtype).removeprefix("torch."), "checkpointing": spec.checkpointing,
           "optimizer": "Adam" if spec.optimizer else "none", "config": spec.config, "notes": spec.notes}
    if model is not None:
        out["params_teacher"] = count(model)
    if net is not None:
        out["params_student"] = count(net)
    return out


def run_family(name: str, spec: Spec, args, device: torch.device) -> dict:
    """Every case of one family, within its time budget; an error in a case is recorded, not raised."""
    start = time.perf_counter()
    half = PRECISIONS[args.precision] if args.precision != "fp32" else None
    out = describe(spec) | {"cases": {}, "skipped": [], "errors": {}}
    if start > args.deadline:
        out["skipped"] = ["all: the run's time budget is spent"]
        print(f"{name}: skipped (the run's time budget is spent)", flush=True)
        return out
    try:
        b = build(spec, device, half)
    except Exception as e:  # recorded: one family's failure must not cost the others (one device call)
        traceback.print_exc()
        out["errors"]["build"] = f"{type(e).__name__}: {e}"
        return out
    out |= describe(spec, b.model, b.net)
    out["build_s"] = time.perf_counter() - start
    print(f"{name}: built in {out['build_s']:.1f} s ({out['params_student'] / 1e6:.1f}M parameters)", flush=True)
    cases = {"tangent": tangent_case, "step": step_case}
    cases |= {f"latency batch {n}": (lambda b, a, n=n: latency_case(b, a, n)) for n in args.latency_batches}
    for case, fn in cases.items():
        now = time.perf_counter()
        if (args.budget_s is not None and now - start > args.budget_s) or now > args.deadline:
            out["skipped"].append(case)
            print(f"  {case}: skipped (the family's or the run's time budget is spent)", flush=True)
            continue
        try:
            out["cases"][case] = fn(b, args)
            print(f"  {case}: {summary(out['cases'][case])}", flush=True)
        except Exception as e:  # recorded, as above
            traceback.print_exc()
            out["errors"][case] = f"{type(e).__name__}: {str(e)[:500]}"
        free(device)
    del b
    free(device)
    out["seconds"] = time.perf_counter() - start
    return out


def summary(case: dict) -> str:
    timings = case.get("timings", {})
    parts = [f"{k} {v['median_ms']:.1f} ms" for k, v in timings.items()]
    if "ratio" in case:
        parts.append(f"ratio {case['ratio']:.2f}")
    return f"batch {case.get('batch')}: " + ", ".join(parts)


# -- the dry run ---------------------------------------------------------------------------------------------------
def dry_run(specs: dict[str, Spec]) -> dict:
    """Each configuration on the meta device: construction, student config, parameter counts, the step's weight
    and optimizer memory (teacher bf16; student weights and gradients in its dtype, Adam moments fp32), and one
    teacher forward on meta tensors at batch 1 (shapes)."""
    rows = {}
    for name, spec in specs.items():
        sched = scheduler(spec.scheduler)
        with torch.device("meta"):
            model = build_model(spec)
        cfg = student_config(spec.model_class, dict(model.config), type(sched).__name__, dict(sched.config),
                             guidance_embed=True, shape=spec.shape, checkpointing=spec.checkpointing)
        with torch.device("meta"):  # the student's network (its config: the guidance embedder switched on)
            inner = build_model(replace(spec, config=cfg.model_config))
        net = DiffusersNet(cfg, SIGMA_D, model=inner)  # scm's heads, small, on the CPU
        teacher = from_diffusers(model, sched, sigma_d=SIGMA_D)
        with torch.device("meta"):
            x, t = torch.empty(1, *spec.shape), torch.full((1,), 0.5)
            own = {"guidance": torch.full((1,), 2.0)} if teacher.takes_guidance else {}
            out_shape = teacher(x, t, **prompts(spec, 1, "meta"), **own).shape
        teacher, student = count(model), count(net)
        weight_bytes = 2 if spec.student_dtype == torch.bfloat16 else 4
        gib = (2 * teacher + 2 * weight_bytes * student + (8 * student if spec.optimizer else 0)) / 2**30
        rows[name] = describe(spec) | {
            "params_teacher": teacher, "params_student": student, "expected_params": spec.expected_params,
            "relative_to_expected": teacher / spec.expected_params if spec.expected_params else None,
            "teacher_output_shape": list(out_shape), "step_weights_gib": gib, "student_guidance": cfg.guidance_embed,
            "native_guidance": bool(cfg.model_config.get("guidance_embeds"))}
        print(f"{name}: {spec.title}: teacher {teacher / 1e9:.3f}B, student {student / 1e9:.3f}B parameters, "
              f"weights + gradients + optimizer {gib:.1f} GiB, teacher output {list(out_shape)}", flush=True)
        del model, net
    return rows


def dry_run_report(rows: dict, args) -> Report:
    report = Report(f"Text-to-image students: the `{args.size}` configurations on the meta device (dry run)")
    report.table(["family", "class", "latents", "prompt", "teacher params", "published", "student params",
                  "weights + grads + Adam (GiB)", "teacher output"],
                 [[r["title"], r["model_class"], "×".join(map(str, r["latents"][::-1])),
                   f"{r['tokens']}×{r['text_width']}" + (f" + pooled {r['pooled_width']}" if r["pooled_width"] else ""),
                   f"{r['params_teacher'] / 1e9:.3f}B",
                   f"{r['expected_params'] / 1e9:.2f}B" if r["expected_params"] else "–",
                   f"{r['params_student'] / 1e9:.3f}B", f"{r['step_weights_gib']:.1f}",
                   "×".join(map(str, r["teacher_output_shape"]))] for r in rows.values()])
    report.text("Built on the meta device (no memory, no weights): the configurations construct, the students' "
                "configurations pass scm's checks and a teacher forward runs on meta tensors at the real prompt "
                "length. The student has the teacher's parameters plus scm's w_φ head and guidance embedding (SD3, "
                "PixArt, SDXL) or the class's own guidance embedder switched on (Sana; Flux-dev has it already). "
                "Memory column: teacher in bf16, student weights and gradients in its dtype, Adam's two fp32 "
                "moments where the step has an optimizer; activations come on top.")
    return report


# -- the report ----------------------------------------------------------------------------------------------------
def _ms(row: dict) -> str:
    return f"{row['median_ms']:.1f} ({row['min_ms']:.1f}–{row['max_ms']:.1f})"


def _mem(row: dict) -> str:
    if row.get("above_mib") is None:
        return "not measured"
    return f"{row['above_mib']:.0f}" + (f" / {row['peak_mib']:.0f}" if row["peak_mib"] is not None else "")


def tables(report: Report, families: dict, memory: str) -> None:
    summary_rows, case_rows, latency_rows = [], [], []
    for fam in families.values():
        c = fam["cases"]
        tan, step = c.get("tangent", {}), c.get("step", {})
        params = f"{fam['params_student'] / 1e6:.1f}M" if "params_student" in fam else "–"
        summary_rows.append([
            fam["title"], params, "×".join(map(str, fam["latents"][::-1])), fam["tokens"],
            f"{tan['ratio']:.2f} ({tan['ratio_minima']:.2f})" if "ratio" in tan else "–",
            f"{tan['student_over_teacher']:.2f}" if "ratio" in tan else "–",
            f"{step['ratio']:.2f} ({step['ratio_minima']:.2f})" if "ratio" in step else "–",
            step.get("teacher_evals_per_step", "–"), step.get("batch") or "–"])
        for case in ("tangent", "step"):
            for name, row in c.get(case, {}).get("timings", {}).items():
                case_rows.append([fam["title"], f"{case}: {name}", c[case]["batch"], _ms(row), _mem(row)])
        for case, val in c.items():
            if case.startswith("latency"):
                t = val["timings"]
                latency_rows.append([fam["title"], val["batch"], _ms(t["1-step"]), _ms(t["2-step"]),
                                     f"{t['1-step']['ms_per_image']:.1f}", f"{t['2-step']['ms_per_image']:.1f}",
                                     _mem(t["2-step"])])
    report.table(["family", "student params", "latents", "prompt tokens", "tangent pass / forward",
                  "student / teacher forward", "sCD step / teacher forward", "teacher evals per step",
                  "step batch"], summary_rows)
    report.text("Ratios of medians (of minima in brackets).")
    report.heading("Each case: median (min–max) ms and peak memory")
    report.table(["family", "case", "batch", "ms", f"peak memory, MiB ({memory})"], case_rows)
    report.heading("Sampling latency of the student (denoiser only)")
    report.table(["family", "batch", "1-step ms", "2-step ms", "1-step ms/img", "2-step ms/img",
                  f"2-step peak MiB ({memory})"], latency_rows)


def reading(families: dict, args) -> str:
    """One paragraph on the ratios, from the figures."""
    tan = {f["title"]: f["cases"]["tangent"]["ratio"] for f in families.values() if "tangent" in f["cases"]}
    steps = {f["title"]: f["cases"]["step"] for f in families.values() if "ratio" in f["cases"].get("step", {})}
    parts = []
    if tan:
        parts.append(f"The tangent pass (forward + JVP through scm's exact attention) costs {_span(tan, 2)} a "
                     "student forward; forward-mode AD computes each op's "
                     "primal and tangent, so about 2× is the floor, and attention's tangent (four products and "
                     "the softmax Jacobian against two products) and elementwise tangents add to it.")
    if steps:
        r = {k: v["ratio"] for k, v in steps.items()}
        rest = [f"{f['title']} {beyond:.1f}" for f in families.values() if (beyond := step_rest(f)) is not None]
        parts.append(f"One guided sCD step costs {_span(r, 1)} a teacher forward: the "
                     "CFG teacher's two evaluations (one for Flux-dev, which takes the scale as an input), the "
                     "student's pass with its tangent (fused: about the tangent ratio; separate, with "
                     "checkpointing: the tangent pass plus a forward and the backward's recomputation), and the "
                     "backward and optimizer update." + (
                         " What the step costs beyond the teacher's evaluations and the tangent pass, in teacher "
                         f"forwards (the backward, update and overheads; a difference of noisy medians): "
                         f"{', '.join(rest)}." if rest else ""))
    if args.device == "cpu" or args.size == "tiny":
        parts.append("On the CPU and at small sizes, per-call overheads (Python, scm's attention mode, small "
                     "kernels) and the CPU's attention path (the student's blocked math, where the teacher runs "
                     "PyTorch's fused kernel: the student / teacher forward column) weigh more than they do at the "
                     "real sizes on a GPU, where the matrix products dominate: these figures check the code path "
                     "and the structure of the cost; the real ones, on a GPU, are the answer.")
    return " ".join(parts)


def _span(values: dict, digits: int) -> str:
    """'a× (lowest family) to b× (highest)', or one value."""
    lo, hi = min(values, key=values.get), max(values, key=values.get)
    if lo == hi:
        return f"{values[lo]:.{digits}f}× ({lo})"
    return f"{values[lo]:.{digits}f}× ({lo}) to {values[hi]:.{digits}f}× ({hi})"


def step_rest(family: dict) -> float | None:
    """What a step costs beyond the teacher's evaluations and the tangent pass, in teacher forwards (the tangent
    pass in teacher forwards from the tangent case); None unless both cases ran at the same batch."""
    tan, step = family["cases"].get("tangent"), family["cases"].get("step", {})
    if tan is None or "ratio" not in step or tan["batch"] != step["batch"]:
        return None
    tangent = tan["timings"]["forward + JVP"]["median_ms"] / tan["timings"]["teacher forward"]["median_ms"]
    return step["ratio"] - step["teacher_evals_per_step"] - tangent


def write_report(families: dict, args, device: torch.device, final: bool = True) -> None:
    import diffusers

    memory = ("CUDA: above what was allocated before the case / max_memory_allocated" if device.type == "cuda"
              else "CPU: growth of the process's peak RSS over one call, above the models / peak RSS")
    payload = {"size": args.size, "device": str(device), "precision": args.precision, "repeats": args.repeats,
               "warmup": args.warmup, "sigma_d": SIGMA_D, "guidance_range": GUIDANCE,
               "sample_guidance": SAMPLE_GUIDANCE, "budget_s_per_family": args.budget_s,
               "budget_s_total": args.total_budget_s, "memory": memory,
               "seconds": args.seconds, "load_average_before_after": args.load, "shrink": args.shrink,
               "diffusers": diffusers.__version__, "torch": torch.__version__, "triton": _triton_version(),
               "families": families}
    report = Report(f"sCD on diffusers' text-to-image networks: tangent pass, step, memory and latency "
                    f"(`{args.size}`{', shrunk' if args.shrink else ''}, {args.precision}, {device})")
    report.text(f"diffusers {diffusers.__version__}, torch {torch.__version__}. Random weights; guidance "
                f"s ~ U{list(GUIDANCE)} in the step, {SAMPLE_GUIDANCE} elsewhere; σ_d = {SIGMA_D}. Peak memory: "
                f"{memory}.")
    tables(report, families, memory)
    problems = [f"{f['title']}: {case}: {msg}" for f in families.values() for case, msg in f["errors"].items()]
    problems += [f"{f['title']}: skipped after its budget: {', '.join(f['skipped'])}" for f in families.values()
                 if f["skipped"]]
    problems += [f"{f['title']}: step out of memory at batch {o['batch']}" for f in families.values()
                 for o in f["cases"].get("step", {}).get("out_of_memory", [])]
    if problems:
        report.heading("Skipped, failed, out of memory")
        report.bullets(problems)
    report.heading("Reading")
    report.text(reading(families, args))
    notes = [f"{f['title']}: {n}" for f in families.values() for n in f["notes"]]
    if notes:
        report.bullets(notes)
    name = args.name or f"t2i_cost-{args.size}" + ("-shrunk" if args.shrink else "")
    out_dir = args.out or (RESULTS / "gpu" if device.type == "cuda" else RESULTS)
    if final:
        print(report.to_markdown())
    json_path, md_path = write_results(name, payload, report, Path(out_dir))
    print(f"wrote {json_path} and {md_path} ({machine().get('gpu', machine()['cpu'])})", flush=True)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    ap.add_argument("--device", default=None, help="default: cpu for tiny, cuda for real")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 tiny, bf16 real")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (default: 3 tiny, 2 real)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per case (the last one measures memory)")
    ap.add_argument("--batch", type=int, default=None, help="batch of the tangent case (default: 4 tiny, 2 real)")
    ap.add_argument("--step-batches", default=None, help="batches the step tries in turn (default: the family's)")
    ap.add_argument("--latency-batches", default=None, help="sampling batches (default: 1,4 tiny; 1,16 real)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds per family (default: none tiny, 75 real)")
    ap.add_argument("--total-budget-s", type=float, default=None,
                    help="seconds for the run: no case starts after it (default: none tiny, 420 real)")
    ap.add_argument("--dry-run", action="store_true", help="build on the meta device only: configs and counts")
    ap.add_argument("--shrink", action="store_true", help="real configs cut to one block, 1/8 side (a CPU check)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--name", default=None, help="result file stem (default t2i_cost-<size>)")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results[/gpu])")
    args = ap.parse_args()
    real = args.size == "real"
    args.device = args.device or ("cuda" if real and not args.shrink else "cpu")
    args.precision = args.precision or ("bf16" if real else "fp32")
    args.repeats = args.repeats or (2 if real else 3)
    args.warmup = max(1, args.warmup)
    args.batch = args.batch or (2 if real else 4)
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    args.step_batches = ints(args.step_batches) if args.step_batches else None
    args.latency_batches = ints(args.latency_batches or ("1,16" if real else "1,4"))
    if real and not args.shrink:
        args.budget_s = 75.0 if args.budget_s is None else args.budget_s
        args.total_budget_s = 420.0 if args.total_budget_s is None else args.total_budget_s
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        ap.error(f"--families: unknown {unknown} (known: {', '.join(FAMILIES)})")
    return args


def main() -> int:
    args = parse_args()
    specs = (real_specs() if args.size == "real" else tiny_specs())
    specs = {n: shrunk(specs[n]) if args.shrink else specs[n] for n in args.families}
    if args.dry_run:
        rows = dry_run(specs)
        report = dry_run_report(rows, args)
        print(report.to_markdown())
        json_path, md_path = write_results(args.name or f"t2i_cost-{args.size}-dry-run", {"families": rows}, report,
                                           Path(args.out or RESULTS))
        print(f"wrote {json_path} and {md_path}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (the tiny size runs on the CPU: --size tiny)")
    start, load = time.perf_counter(), os.getloadavg()[0]  # other work on a CPU distorts its timings
    args.deadline = start + (args.total_budget_s if args.total_budget_s is not None else math.inf)
    families = {}
    for i, (name, spec) in enumerate(specs.items()):
        families[name] = run_family(name, spec, args, device)
        args.seconds, args.load = time.perf_counter() - start, (load, os.getloadavg()[0])
        # written after every family, so that a run stopped at a time limit leaves what it measured
        write_report(families, args, device, final=i == len(specs) - 1)
    print(f"all families: {args.seconds:.0f} s", flush=True)
    return 1 if any(f["errors"] for f in families.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
