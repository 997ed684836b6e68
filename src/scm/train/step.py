"""One optimizer step over the global batch: the objective and backward of each micro-batch, gradient clipping,
the skip decision for non-finite steps, the optimizer step, EDM2's forced weight normalization and the EMA.
Where the objective trains a network of its own alongside (sCD + VSD's critic: `TrainState.critic`), the step hands
it to the objective, whose one loss holds both networks' terms, and clips and steps each network with its own
optimizer (the critic's learning rate: `optim.critic_lr_scale` × the student's; no EMA).

The step reads tensor values once: the step's loss and gradient norms, to decide whether to apply it (a
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
    model, scaler = state.model, state.scaler
    for (o, _, _), scale in zip(state.parts, (1.0, cfg.optim.critic_lr_scale), strict=False):
        for group in o.param_groups:
            group["lr"] = lr * scale
    critic = {} if state.critic is None else {"critic": state.critic}  # trained by the objective alongside
    half = PRECISIONS[cfg.precision] if cfg.precision != "fp32" else None
    step_loss = torch.zeros((), device=info.device)
    stats: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(batches):
        torch.manual_seed(mb.dropout_seed)  # dropout masks: a function of (seed, step, slot)
        with no_sync(model, i < len(batches) - 1), torch.autocast(info.device.type, dtype=half,
                                                                  enabled=half is not None):
            loss, s = objective(model, mb.x0, state.kimg, generator=mb.generator, **critic, **mb.cond)
        scaler.scale(loss / len(batches)).backward()
        step_loss += loss.detach().float() / len(batches)
        for k, v in s.items():
            stats[k] = stats.get(k, 0) + v.detach().float() / len(batches)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    norms = []
    for o, params, _ in state.parts:  # each network's gradient clipped on its own
        if _has_grads(params):
            scaler.unscale_(o)
        norms.append(_clipped_norm(params, clip))
    step_loss = all_reduce_mean(step_loss, info)
    values = torch.stack([step_loss, *norms]).tolist()  # the step's one synchronisation
    loss_value, norm_value = values[0], values[1]
    if critic:
        stats["critic_grad_norm"] = norms[1].detach()
    finite = all(math.isfinite(v) for v in values)
    if finite:
        for o, params, net in state.parts:
            if not _has_grads(params):  # a critic before its phase starts (loss.vsd_start_kimg)
                continue
            scaler.step(o)
            normalize = getattr(net, "normalize_weights_", None)
            if normalize is not None:
                normalize()
        scaler.update()
        state.bad_run = 0
    else:
        if scaler.is_enabled():
            scaler.update()
        state.bad_run += 1
        state.bad_steps += 1
    for o, _, _ in state.parts:
        o.zero_grad(set_to_none=True)
    state.step += 1
    state.cur_nimg += cfg.batch
    if finite:
        state.ema.update(state.net, state.cur_nimg, cfg.batch)
    return StepResult(finite, loss_value, norm_value, stats)


def _clipped_norm(params: list[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The global gradient norm of `params` before clipping them to `clip` (a full tensor under FSDP2)."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()


def _has_grads(params: list[torch.nn.Parameter]) -> bool:
    return any(p.grad is not None for p in params)
