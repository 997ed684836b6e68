"""One optimizer step over the global batch: the objective and backward of each micro-batch, gradient clipping,
the skip decision for non-finite steps, the optimizer step, EDM2's forced weight normalization and the EMA.

The step reads tensor values once: the step's loss and gradient norm, to decide whether to apply it (a
host-device synchronisation on a GPU; under fp16 the loss scaler adds its own inf check). Everything else stays
on the device; the statistics are handed back as tensors for the logger to read every `log_every` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scm.config import TrainConfig
from scm.precision import PRECISIONS
from scm.train.distributed import DistInfo, all_reduce_mean, no_sync
from scm.train.state import TrainState

__all__ = ["MicroBatch", "StepResult", "train_step"]


@dataclass
class MicroBatch:
    x0: torch.Tensor                  # images in model space, on the device
    cond: dict                        # the network's conditioning (`Conditioning.from_batch`: {"labels": …} or {})
    generator: torch.Generator        # the objective's noise: t, z (and sCD's guidance scales)
    dropout_seed: int                 # seeds the global RNG, which dropout draws from


@dataclass
class StepResult:
    finite: bool                      # False: the step was skipped (non-finite loss or gradient)
    loss: float                       # the step's mean loss over all processes (host value)
    grad_norm: float                  # the global gradient norm before clipping (host value)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's statistics (device tensors)


def train_step(state: TrainState, objective: Callable, batches: list[MicroBatch], cfg: TrainConfig, lr: float,
               info: DistInfo) -> StepResult:
    """Accumulate the gradients of `batches` (this process's micro-batches), then step unless non-finite."""
    model, opt, scaler = state.model, state.optimizer, state.scaler
    for group in opt.param_groups:
        group["lr"] = lr
    half = PRECISIONS[cfg.precision] if cfg.precision != "fp32" else None
    step_loss = torch.zeros((), device=info.device)
    stats: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(batches):
        torch.manual_seed(mb.dropout_seed)  # dropout masks: a function of (seed, step, slot)
        with no_sync(model, i < len(batches) - 1), torch.autocast(info.device.type, dtype=half,
                                                                  enabled=half is not None):
            loss, s = objective(model, mb.x0, state.kimg, generator=mb.generator, **mb.cond)
        scaler.scale(loss / len(batches)).backward()
        step_loss += loss.detach().float() / len(batches)
        for k, v in s.items():
            stats[k] = stats.get(k, 0) + v.detach().float() / len(batches)
    scaler.unscale_(opt)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trainable, clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    step_loss = all_reduce_mean(step_loss, info)
    loss_value, norm_value = torch.stack([step_loss, grad_norm.float()]).tolist()  # the step's one synchronisation
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    if finite:
        scaler.step(opt)
        scaler.update()
        normalize = getattr(state.net, "normalize_weights_", None)
        if normalize is not None:
            normalize()
        state.bad_run = 0
    else:
        if scaler.is_enabled():
            scaler.update()
        state.bad_run += 1
        state.bad_steps += 1
    opt.zero_grad(set_to_none=True)
    state.step += 1
    state.cur_nimg += cfg.batch
    if finite:
        state.ema.update(state.net, state.cur_nimg, cfg.batch)
    return StepResult(finite, loss_value, norm_value, stats)
