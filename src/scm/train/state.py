"""The training state: everything that changes while training and is saved in a checkpoint (EDM2's `state`
plus its checkpoint I/O). `TrainState.save` / `load` write and read it through the run-directory format
(`scm.runs`); a resumed run continues bit for bit (tests/test_train.py)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scm.config import TrainConfig
from scm.errors import CheckpointError
from scm.runs import RunDir, ema_key, trained_keys
from scm.train.distributed import (
    DistInfo,
    barrier,
    full_model_state,
    load_full_model_state,
    load_optimizer_state,
    optimizer_state,
    unwrap,
    wrap_model,
)
from scm.train.ema import PowerEMA
from scm.train.optim import make_optimizer

__all__ = ["TrainState"]


@dataclass
class TrainState:
    model: nn.Module                   # the network as trained (wrapped in DDP / FSDP2 under torchrun)
    optimizer: torch.optim.Optimizer
    ema: PowerEMA
    scaler: torch.amp.GradScaler       # loss scaling (enabled for fp16 only)
    step: int = 0                      # optimizer steps taken, skipped ones included
    cur_nimg: int = 0                  # training images seen
    bad_steps: int = 0                 # steps skipped for a non-finite loss or gradient, in all
    bad_run: int = 0                   # … in a row (a good step resets it)
    critic: nn.Module | None = None    # a network the objective trains alongside (sCD + VSD's fake score), or None
    critic_optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def create(cls, net: nn.Module, cfg: TrainConfig, info: DistInfo, critic: nn.Module | None = None) -> TrainState:
        """Wrap `net` for this process group, with a fresh optimizer, EMA and loss scaler; and `critic`, when the
        objective trains one, with an optimizer of its own (the same settings and schedule; no EMA)."""
        model = wrap_model(net.train(), info, cfg.distributed)
        trained = [p for p in model.parameters() if p.requires_grad]  # a LoRA student's base is frozen
        state = cls(model, make_optimizer(trained, cfg.optim), PowerEMA(unwrap(model), cfg.ema.stds,
                                                                        trained_keys(net)),
                    torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16"))
        if critic is not None:
            state.critic = wrap_model(critic.train(), info, cfg.distributed)
            state.critic_optimizer = make_optimizer(list(state.critic.parameters()), cfg.optim)
        return state

    @functools.cached_property
    def parts(self) -> list[tuple[torch.optim.Optimizer, list[nn.Parameter], nn.Module]]:
        """Each trained network (the student, then a critic) with its optimizer and the parameters that optimizer
        updates (a LoRA student's: its adapters), read every step, so listed once."""
        nets = [(self.optimizer, self.net)] + ([(self.critic_optimizer, unwrap(self.critic))] if self.critic else [])
        return [(o, [p for g in o.param_groups for p in g["params"]], net) for o, net in nets]

    @property
    def stems(self) -> tuple[str, ...]:
        """The files of this run's checkpoints."""
        return ("net", "ema", "optim") + (("critic", "critic_optim") if self.critic is not None else ())

    @property
    def net(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def kimg(self) -> float:
        return self.cur_nimg / 1000

    def save(self, run: RunDir, keep: int, info: DistInfo) -> Path | None:
        """Write a checkpoint (every process takes part in gathering; the main process writes)."""
        tensors, meta = optimizer_state(self.model, self.optimizer)
        files = {"net": self._net_state(full_model_state(self.model)), "ema": self.ema.state_dict(), "optim": tensors}
        critic_meta = None
        if self.critic is not None:
            files["critic_optim"], critic_meta = optimizer_state(self.critic, self.critic_optimizer)
            files["critic"] = full_model_state(self.critic)
        path = None
        if info.is_main:
            state = {"step": self.step, "cur_nimg": self.cur_nimg, "kimg": self.kimg, "bad_steps": self.bad_steps,
                     "bad_run": self.bad_run, "optimizer": meta, "critic_optimizer": critic_meta,
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     "time": time.time(), "torch": torch.__version__}
            path = run.save(self.step, files, state, keep)
        barrier(info)
        return path

    def _net_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the network's state: all of it, or a LoRA student's trained tensors."""
        keys = trained_keys(self.net)
        return state if keys is None or not state else {k: state[k] for k in keys}  # (empty off the main rank)

    def expected_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """What a checkpoint of this run must hold: the network's tensors and each EMA's (names and full shapes)."""
        net = {k: tuple(v.shape) for k, v in self._net_state(self.net.state_dict()).items()}
        ema = {ema_key(s, k): tuple(v.shape) for s, shadow in self.ema.shadow.items() for k, v in shadow.items()}
        critic = {} if self.critic is None else {
            "critic": {k: tuple(v.shape) for k, v in unwrap(self.critic).state_dict().items()}}
        # (shapes of sharded tensors are their full shapes: nothing is gathered)
        return {"net": net, "ema": ema, **critic}

    def load(self, ckpt: Path, files: dict[str, dict[str, torch.Tensor]] | None = None, state: dict | None = None):
        """Continue from a checkpoint: weights, optimizer, EMA, loss scale and counters (`files` and `state`: the
        checkpoint as `RunDir.load` read and verified it; read here when not given)."""
        if files is None or state is None:
            files, state = RunDir.load(ckpt, self.stems, expect=self.expected_shapes())
        try:
            load_full_model_state(self.model, files["net"], strict=trained_keys(self.net) is None)
            load_optimizer_state(self.model, self.optimizer, files["optim"], state["optimizer"])
            if self.critic is not None:
                load_full_model_state(self.critic, files["critic"])
                load_optimizer_state(self.critic, self.critic_optimizer, files["critic_optim"],
                                     state["critic_optimizer"])
            self.ema.load_state_dict(files["ema"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step, self.cur_nimg = int(state["step"]), int(state["cur_nimg"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt}: does not fit this run ({type(e).__name__}: {e})") from None
        self.bad_steps, self.bad_run = int(state.get("bad_steps", 0)), int(state.get("bad_run", 0))
