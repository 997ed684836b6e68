"""EDM2's power-function EMA (Karras et al. 2024, §3.1 and App. C), one average per relative std σ_rel, and its
snapshots for post-hoc EMA (§3.2, App. C.3).

The average at time t weights past parameters by τ^γ (τ ≤ t); its relative std is
σ_rel = sqrt((γ + 1)/((γ + 2)²(γ + 3))), so σ_rel picks γ as the largest real root of
γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0. Incrementally: ema ← β·ema + (1 − β)·θ with
β = (1 − Δ/t)^(γ + 1), t the images seen after the step and Δ the batch. The first update copies θ, so a
short run is never dominated by its random initialization (which a fixed decay such as 0.9999 would be for
its first tens of thousands of steps).

Post-hoc EMA: training stores every profile's average every `ema.snapshot_kimg` (`PowerEMA.snapshot`, into
RUN/ema-snapshots/, `scm.runs`); `scm.posthoc` (an offline tool, outside the training engine) combines them into
the average of any other σ_rel after training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scm.ema_profile import std_to_exp
from scm.runs import RunDir, ema_key

__all__ = ["PowerEMA"]


def _full(v: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) value gathered in full; plain tensors pass through. Collective for DTensors."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def _copy_full_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if hasattr(dst, "device_mesh"):  # DTensor: keep this rank's shard of the full value
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src)


class PowerEMA:
    """Shadow copies (float32) of a module's parameters and buffers, one set per σ_rel."""

    def __init__(self, net: nn.Module, stds: tuple[float, ...], keys: list[str] | None = None):
        """Averages of `net`'s floating-point state, or of its entries `keys` only (a LoRA student's trained
        tensors: its frozen base needs none)."""
        self.stds = tuple(float(s) for s in stds)
        self.exps = {s: std_to_exp(s) for s in self.stds}
        self.keys = None if keys is None else set(keys)
        self.shadow = {s: {k: v.detach().clone().float() for k, v in self._averaged(net).items()} for s in self.stds}

    def _averaged(self, net: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in net.state_dict().items()
                if v.is_floating_point() and (self.keys is None or k in self.keys)}

    @torch.no_grad()
    def update(self, net: nn.Module, cur_nimg: int, batch: int) -> None:
        current = self._averaged(net)
        for s, shadow in self.shadow.items():
            beta = (1 - batch / max(cur_nimg, batch)) ** (self.exps[s] + 1)
            for k, v in shadow.items():
                v.lerp_(current[k].float(), 1 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) tensors; under FSDP2 every process must call it."""
        return {ema_key(s, k): _full(v) for s, shadow in self.shadow.items() for k, v in shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for s, shadow in self.shadow.items():
            for k, v in shadow.items():
                name = ema_key(s, k)
                if name not in tensors:
                    raise KeyError(f"EMA tensor {name!r} missing from the checkpoint")
                _copy_full_into(v, tensors[name])

    def weights(self, std: float | None = None) -> dict[str, torch.Tensor]:
        """The averaged state dict for σ_rel = std (default: the first), full tensors (collective under FSDP2)."""
        std = self.stds[0] if std is None else float(std)
        if std not in self.shadow:
            raise KeyError(f"no EMA with σ_rel={std}; this run keeps {self.stds}")
        return {k: _full(v) for k, v in self.shadow[std].items()}

    def snapshot(self, run: RunDir, step: int, cur_nimg: int, batch: int, every_kimg: float | None, *, due: bool,
                 end: bool, write: bool = True) -> Path | None:
        """EDM2's snapshots for post-hoc EMA: every profile's average, with its image count and exponents, when
        training has just crossed a multiple of `every_kimg` (`due`) or at the last step of a training session
        (`end`: stopped, interrupted or diverged); nothing when every_kimg is 0 or None. Called before the
        checkpoint of the same step: a crash between the two leaves a snapshot past the newest checkpoint, which
        the resumed run drops and writes again, never a checkpoint without its snapshot. Collective under FSDP2
        (every process calls it); only the process with `write` writes."""
        if not every_kimg or not (due or end):
            return None
        tensors = self.state_dict()
        if not write:
            return None
        info = {"cur_nimg": int(cur_nimg), "kimg": cur_nimg / 1000, "batch": int(batch),
                "snapshot_kimg": float(every_kimg), "stds": list(self.stds), "exps": [self.exps[s] for s in self.stds]}
        return run.save_ema_snapshot(step, tensors, info, end=not due)
