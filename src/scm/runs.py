"""Loading trained runs: a run directory → its configuration and a network with its EMA (or raw) weights.

Used for sCD teachers (`--teacher`), initializations (`--init`), sampling and evaluation. Reads only JSON and
safetensors; every problem is a one-line error naming the path.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from scm.config import ConfigError, TrainConfig, from_dict
from scm.nets.unet import UNet
from scm.train.checkpoint import CheckpointError, RunDir, load_tensors
from scm.train.ema import ema_stds_in, ema_weights

__all__ = ["LoadedRun", "load_run", "load_teacher_factory"]


@dataclass
class LoadedRun:
    cfg: TrainConfig
    net: UNet
    checkpoint: Path
    ema_std: float | None      # None: raw (non-averaged) weights
    step: int


def read_run_config(path: str | Path) -> TrainConfig:
    run = RunDir(path)
    raw = run.read_config()
    try:
        return from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{run.config_path}: not a valid scm configuration ({e})") from None


def load_run(path: str | Path, ema_std: float | None = None, *, raw: bool = False, device="cpu") -> LoadedRun:
    """The newest checkpoint of a run as an eval-mode network without gradients.

    ema_std picks the EMA by σ_rel (default: the run's first); raw=True takes the non-averaged weights."""
    run = RunDir(path)
    cfg = read_run_config(path)
    ckpt = run.latest()
    if ckpt is None:
        raise CheckpointError(f"{run.path}: the run has no checkpoint yet")
    if raw:
        weights, std = load_tensors(ckpt / "net.safetensors"), None
    else:
        tensors = load_tensors(ckpt / "ema.safetensors")
        std = cfg.ema.stds[0] if ema_std is None else float(ema_std)
        try:
            weights = ema_weights(tensors, std)
        except KeyError:
            raise CheckpointError(f"{ckpt}: no EMA with σ_rel={std} (available: {ema_stds_in(tensors)})") from None
    net = UNet(cfg.net)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not match the run's network (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    step = int(json.loads((ckpt / "state.json").read_text()).get("step", 0))
    return LoadedRun(cfg, net.to(device).eval().requires_grad_(False), ckpt, std, step)


def load_teacher_factory(spec: str):
    """'package.module:function' → function() → a TrigFlow callable fn(x_t/σ_d, t, **cond) -> F."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"teacher={spec!r}: cannot import {attr!r} from {module_name!r} ({e})") from None
    fn = factory()
    if not callable(fn):
        raise ConfigError(f"teacher={spec!r}: {attr}() must return a callable fn(x_scaled, t, **cond) -> F")
    return fn


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()

