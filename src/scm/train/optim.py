"""Optimizers as in the paper (Adam / RAdam with their betas and eps) and EDM2's learning-rate schedule."""

from __future__ import annotations

import math

import torch

from scm.config import OptimConfig

__all__ = ["learning_rate", "make_optimizer"]


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.optimizer]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def learning_rate(cfg: OptimConfig, cur_kimg: float) -> float:
    """EDM2 (eq. 67 + ramp-up): α_ref / sqrt(max(t/t_ref, 1)) · min(1, t/t_rampup), t in kimg, so the schedule
    does not depend on the batch size. Without lr_decay_kimg the rate is constant (the paper's CIFAR-10 CMs)."""
    lr = cfg.lr
    if cfg.lr_decay_kimg:
        lr /= math.sqrt(max(cur_kimg / cfg.lr_decay_kimg, 1.0))
    if cfg.lr_rampup_kimg > 0:
        lr *= min(1.0, cur_kimg / cfg.lr_rampup_kimg)
    return lr
