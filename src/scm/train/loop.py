"""The training loop: method-agnostic, it is handed an objective and never knows the maths.

Read top to bottom: set up (data, network, objective, optimizer, EMA, resume), then each step: the global
batch's micro-batches through the objective and backward, a finiteness check (non-finite steps are skipped
and counted), gradient clipping, EDM2's learning rate, the optimizer step, the forced weight normalization,
the EMA; then logs, progress, checkpoints and sample grids.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scm.config import TrainConfig, from_dict, to_dict
from scm.data import load_dataset
from scm.train.batches import BatchPlan
from scm.train.build import build, build_objective
from scm.train.checkpoint import RunDir
from scm.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    full_model_state,
    init_distributed,
    load_full_model_state,
    load_optimizer_state,
    no_sync,
    optimizer_state,
    unwrap,
    wrap_model,
)
from scm.train.ema import PowerEMA
from scm.train.logger import Logger
from scm.train.optim import learning_rate, make_optimizer
from scm.train.samples import sample_grids

__all__ = ["RunError", "TrainResult", "TrainingStopped", "train"]

# Fields that may differ between a run and its --resume (budget, bookkeeping, where it runs).
RESUMABLE_CHANGES = {"kimg", "max_minutes", "device", "log_every", "ckpt_every_kimg", "keep_ckpts", "sample_every_kimg",
                     "sample_count", "sample_ode_steps", "tensorboard", "progress", "max_bad_steps"}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunError(RuntimeError):
    """A problem with the run directory (an existing different run, nothing to resume, …)."""


class TrainingStopped(RuntimeError):
    """Training stopped early: interrupted, or too many consecutive non-finite steps. A checkpoint was saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    run_dir: str
    step: int
    kimg: float
    bad_steps: int
    net: torch.nn.Module
    ema: PowerEMA
    stats: dict = field(default_factory=dict)


def _prepare_run_dir(run: RunDir, cfg: TrainConfig, resume: bool, info: DistInfo):
    """Refuse to overwrite a different run; on --resume check the configuration and find the checkpoint."""
    if resume:
        if not run.config_path.is_file():
            raise RunError(f"--resume: {run.path} holds no run (no config.json)")
        old = to_dict(from_dict(run.read_config()))
        new = to_dict(cfg)
        diff = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} → {new[k]!r}" for k in diff[:4])
            raise RunError(f"--resume: {run.path} was started with a different configuration ({details})")
        ckpt = run.latest()
        if ckpt is None:
            raise RunError(f"--resume: {run.path} has no checkpoint to resume from")
        return ckpt
    if run.config_path.is_file():
        raise RunError(f"{run.path} already holds a run; continue it with --resume or choose another --out")
    if run.path.is_dir() and any(run.path.iterdir()):
        raise RunError(f"{run.path} is not empty and holds no scm run; choose another --out")
    return None


def train(cfg: TrainConfig, *, resume: bool = False, objective_wrapper=None) -> TrainResult:
    info = init_distributed(cfg.device)
    device = info.device
    run = RunDir(cfg.out)
    cfg.validate()

    # -- data, network (maybe initialized from a run), teacher, objective ----------------------------------------
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed (identical on every rank)
    built = build(cfg, data, device)
    cfg = built.cfg
    ckpt = _prepare_run_dir(run, cfg, resume, info)
    slots = info.world * cfg.grad_accum
    if cfg.batch % slots:
        raise RunError(f"batch={cfg.batch} must be divisible by processes × grad_accum = {slots}")
    barrier(info)
    if info.is_main:
        run.write_config(to_dict(cfg))
        run.clean_partial()
    log = Logger(run, cfg, info)
    log.info(data.describe())
    log.info(f"{cfg.method} | preset {cfg.preset} | {built.net.num_parameters() / 1e6:.2f}M parameters | "
             f"{built.init_note} | {info.world} process(es) on {device}")

    objective = build_objective(cfg, built.teacher)
    if objective_wrapper is not None:
        objective = objective_wrapper(objective)
    net = built.net.train()
    model = wrap_model(net, info, cfg.distributed)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    ema = PowerEMA(unwrap(model), cfg.ema.stds)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    plan = BatchPlan(len(data), cfg.batch, cfg.seed)
    step, cur_nimg, bad_total, bad_run = 0, 0, 0, 0

    if ckpt is not None:  # resume: weights, EMA, optimizer, scaler and counters
        files, state = RunDir.load(ckpt)
        load_full_model_state(model, files["net"])
        load_optimizer_state(model, optimizer, files["optim"], state["optimizer"])
        ema.load_state_dict(files["ema"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, cur_nimg = state["step"], state["cur_nimg"]
        bad_total = state.get("bad_steps", 0)
        log.info(f"resumed from {ckpt} at {cur_nimg / 1000:.1f} kimg (step {step})")

    def save_checkpoint() -> None:
        tensors, meta = optimizer_state(model, optimizer)
        files = {"net": full_model_state(model), "ema": ema.state_dict(), "optim": tensors}
        if info.is_main:
            state = {"step": step, "cur_nimg": cur_nimg, "kimg": cur_nimg / 1000, "bad_steps": bad_total,
                     "optimizer": meta, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "time": time.time(), "torch": torch.__version__}
            path = run.save(step, files, state, cfg.keep_ckpts)
            log.info(f"checkpoint {path}")
        barrier(info)

    def save_samples() -> None:
        weights = {k: v.to(device) for k, v in ema.weights().items()}  # every process: gathers FSDP shards
        if info.is_main:
            for p in sample_grids(cfg, weights, device, run.samples_dir, cur_nimg / 1000):
                log.info(f"samples {p}")
        barrier(info)

    stop = _StopFlag()
    total_nimg = math.ceil(round(cfg.kimg * 1000) / cfg.batch) * cfg.batch  # whole steps
    autocast = AUTOCAST[cfg.precision]
    params = [p for p in model.parameters() if p.requires_grad]
    log.start(cur_nimg, total_nimg)
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    stats_acc: dict[str, float] = {}
    with stop.installed():
        while cur_nimg < total_nimg:
            # -- one step over the global batch ----------------------------------------------------------------------
            lr = learning_rate(cfg.optim, cur_nimg / 1000)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=device)
            step_stats: dict[str, torch.Tensor] = {}
            for a in range(cfg.grad_accum):
                slot = info.rank * cfg.grad_accum + a
                x0, labels = data.batch(plan.slot(step, slot, slots), device)
                cond = {"labels": labels} if cfg.conditional else {}
                gen = plan.noise_generator(step, slot, device)
                torch.manual_seed(plan.dropout_seed(step, slot))  # dropout masks: a function of (step, slot)
                with no_sync(model, a < cfg.grad_accum - 1):
                    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                        loss, stats = objective(model, x0, cur_nimg / 1000, generator=gen, **cond)
                    scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.detach().float() / cfg.grad_accum
                for k, v in stats.items():
                    step_stats[k] = step_stats.get(k, 0) + torch.as_tensor(v, device=device).float() / cfg.grad_accum
            scaler.unscale_(optimizer)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            step_loss = all_reduce_mean(step_loss, info)
            finite = bool(torch.isfinite(step_loss)) and bool(torch.isfinite(grad_norm))
            if finite:
                scaler.step(optimizer)
                scaler.update()
                normalize = getattr(unwrap(model), "normalize_weights_", None)
                if normalize is not None:
                    normalize()
                bad_run = 0
            else:
                if scaler.is_enabled():
                    scaler.update()
                bad_run += 1
                bad_total += 1
                log.warn(f"step {step}: non-finite loss or gradient (loss {float(step_loss):.4g}, "
                         f"grad norm {float(grad_norm):.4g}); step skipped ({bad_total} so far)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            cur_nimg += cfg.batch
            if finite:
                ema.update(unwrap(model), cur_nimg, cfg.batch)

            # -- bookkeeping -------------------------------------------------------------------------------------------
            if finite:
                stats_acc = _accumulate(stats_acc, {"loss": step_loss, "grad_norm": grad_norm, **step_stats})
            log.progress(cur_nimg, lr, {"loss": step_loss, "grad_norm": grad_norm, **step_stats}, finite)
            done = cur_nimg >= total_nimg or _agree(time.monotonic() > deadline, info)
            if step % cfg.log_every == 0 or done:
                log.metrics(step, cur_nimg, lr, _mean(stats_acc, info), bad_total)
                stats_acc = {}
            if bad_run >= cfg.max_bad_steps:
                save_checkpoint()
                log.close()
                raise TrainingStopped(
                    f"{bad_run} consecutive steps had a non-finite loss or gradient at {cur_nimg / 1000:.1f} kimg; "
                    f"stopped. The last good weights are in {run.latest()} (lower optim.lr, or set optim.grad_clip)",
                    exit_code=3,
                )
            if stop.requested(info):
                save_checkpoint()
                log.close()
                raise TrainingStopped(
                    f"interrupted at {cur_nimg / 1000:.1f} kimg (step {step}); checkpoint saved, "
                    "continue with --resume",
                    exit_code=130,
                )
            if _crossed(cfg.ckpt_every_kimg, cur_nimg, cfg.batch) or done:
                save_checkpoint()
            if _crossed(cfg.sample_every_kimg, cur_nimg, cfg.batch) or done:
                save_samples()
            if done:
                break
    log.close()
    return TrainResult(str(run.path), step, cur_nimg / 1000, bad_total, unwrap(model), ema, log.last_metrics)


def _agree(flag: bool, info: DistInfo) -> bool:
    """True on every process when it is true on any (so that all stop together)."""
    if not info.enabled:
        return flag
    t = torch.tensor(float(flag), device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t > 0)


def _crossed(every_kimg: float | None, cur_nimg: int, batch: int) -> bool:
    """Did the last step cross a multiple of every_kimg?"""
    if not every_kimg:
        return False
    every = max(1, int(every_kimg * 1000))
    return cur_nimg // every != (cur_nimg - batch) // every


def _accumulate(acc: dict, new: dict) -> dict:
    out = dict(acc)
    for k, v in new.items():
        v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        s, n = out.get(k, (0.0, 0))
        out[k] = (s + v, n + 1)
    return out


def _mean(acc: dict, info: DistInfo) -> dict:
    out = {}
    for k, (s, n) in acc.items():
        out[k] = float(all_reduce_mean(torch.as_tensor(s / n), info))
    return out


class _StopFlag:
    """SIGINT/SIGTERM request a clean stop at the end of the current step (all processes agree on it)."""

    def __init__(self):
        self.flag = False

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            self.flag = True

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                old[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def requested(self, info: DistInfo) -> bool:
        return _agree(self.flag, info)

