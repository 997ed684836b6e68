"""EDM2's power-function EMA (Karras et al. 2024, §3.1 and App. C), one average per relative std σ_rel, its
snapshots and the post-hoc reconstruction of other σ_rel from them (§3.2, App. C.3).

The average at time t weights past parameters by τ^γ (τ ≤ t); its relative std is
σ_rel = sqrt((γ + 1)/((γ + 2)²(γ + 3))), so σ_rel picks γ as the largest real root of
γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0. Incrementally: ema ← β·ema + (1 − β)·θ with
β = (1 − Δ/t)^(γ + 1), t the images seen after the step and Δ the batch. The first update copies θ, so a
short run is never dominated by its random initialization (which a fixed decay such as 0.9999 would be for
its first tens of thousands of steps).

Post-hoc EMA: training stores every profile's average every `ema.snapshot_kimg` (`PowerEMA.snapshot`, into
RUN/ema-snapshots/, `scm.runs`); `plan_reconstruction` finds the combination of snapshots whose averaging profile
is closest to that of another σ_rel at a chosen time (the maths, exact for these discrete updates:
`scm.train.posthoc`), `reconstruct` applies it to the weights and `save_reconstruction` writes the result as a run
directory that sampling, evaluation, teachers and initializations read like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scm.config import from_dict, to_dict
from scm.errors import CheckpointError, InvalidSetting, RunError
from scm.files import atomic_folder, atomic_write, atomic_write_json
from scm.nets.registry import build_net
from scm.runs import EMASnapshot, LoadedRun, RunDir, ema_key, read_run_config
from scm.train.posthoc import SIGMA_REL_MAX, exp_to_std, solve_coefficients, std_to_exp

__all__ = ["PowerEMA", "Reconstruction", "plan_reconstruction", "reconstruct", "reconstructed_run",
           "save_reconstruction", "std_to_exp"]


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

    def __init__(self, net: nn.Module, stds: tuple[float, ...]):
        self.stds = tuple(float(s) for s in stds)
        self.exps = {s: std_to_exp(s) for s in self.stds}
        self.shadow = {
            s: {k: v.detach().clone().float() for k, v in net.state_dict().items() if v.is_floating_point()}
            for s in self.stds
        }

    @torch.no_grad()
    def update(self, net: nn.Module, cur_nimg: int, batch: int) -> None:
        current = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
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


# -- post-hoc EMA ----------------------------------------------------------------------------------------------------
MAX_ERROR = 0.05  # the largest relative L² error of a reconstructed averaging profile accepted by default


@dataclass
class Reconstruction:
    """Which snapshots, with which coefficients, give each requested σ_rel at one time (no tensors read yet)."""

    run: Path
    stds: tuple[float, ...]                     # the requested σ_rel, rounded as EMA keys are (4 decimals)
    step: int                                   # the training step of the target time
    cur_nimg: int                               # the target time t_r in images
    snapshots: list[EMASnapshot]                # those used (taken at or before t_r)
    profiles: tuple[float, ...]                 # the tracked σ_rel combined
    coefficients: dict[float, np.ndarray]       # σ_rel → x [len(snapshots), len(profiles)]
    errors: dict[float, float]                  # σ_rel → ‖Σ x p − p_r‖ / ‖p_r‖
    representable: tuple[float, float] | None   # the σ_rel range these snapshots give within max_error
    max_error: float = MAX_ERROR

    def describe(self) -> dict:
        """A JSON-able record of the reconstruction (what `save_reconstruction` writes beside the weights)."""
        return {"source": str(self.run), "step": self.step, "cur_nimg": self.cur_nimg, "kimg": self.cur_nimg / 1000,
                "profiles": list(self.profiles), "max_error": self.max_error,
                "representable": list(self.representable) if self.representable else None,
                "snapshots": [s.path.name for s in self.snapshots],
                "targets": {f"{s:.4f}": {"gamma": std_to_exp(s), "error": self.errors[s],
                                         "coefficients": self.coefficients[s].tolist()} for s in self.stds}}


def _candidates() -> np.ndarray:
    return np.geomspace(0.002, SIGMA_REL_MAX - 1e-4, 97)


def plan_reconstruction(run: str | Path, stds, *, at_kimg: float | None = None, profiles=None,
                        max_error: float = MAX_ERROR) -> Reconstruction:
    """The least-squares combination of a run's snapshots for each σ_rel in `stds` at `at_kimg` (default: the
    last snapshot's time; rounded to a whole step), from the tracked profiles `profiles` (default: all). Every
    σ_rel must lie in (0, 0.28) and be represented to a relative L² error of its averaging profile of at most
    `max_error` (0.05: closer to the target than the profile of a σ_rel 4–7 % away is; README "Post-hoc EMA").
    With no `stds`, the plan only says which σ_rel range the snapshots represent (`representable`)."""
    path = Path(run)
    read_run_config(path)  # a run directory, with a valid configuration
    snaps = RunDir(path).ema_snapshots()
    if not snaps:
        raise CheckpointError(f"{path}: the run has no EMA snapshots (ema-snapshots/ is missing or empty); train "
                              "with ema.snapshot_kimg > 0 to keep them", key="run")
    stds = tuple(dict.fromkeys(round(float(s), 4) for s in stds))  # none: only the representable range
    for s in stds:
        if not (0 < s < SIGMA_REL_MAX):
            raise InvalidSetting("sigma_rel", s, f"must lie in (0, {SIGMA_REL_MAX}): at σ_rel = {exp_to_std(0):.4f} "
                                 "(γ = 0) the power-function EMA is already the plain average of the whole run")
    if not (isinstance(max_error, (int, float)) and 0 < max_error < 1):
        raise InvalidSetting("max_error", max_error, "must lie in (0, 1)")
    tracked = sorted({s for snap in snaps for s in snap.stds})
    profiles = tuple(tracked if profiles is None else dict.fromkeys(round(float(s), 4) for s in profiles))
    missing = [s for s in profiles if s not in tracked]
    if missing:
        raise InvalidSetting("profiles", missing, f"not tracked by this run's snapshots (they hold σ_rel {tracked})")

    last, batch = snaps[-1], snaps[-1].batch
    if at_kimg is None:
        nimg = last.cur_nimg
    else:
        if not (isinstance(at_kimg, (int, float)) and np.isfinite(at_kimg) and at_kimg > 0):
            raise InvalidSetting("at_kimg", at_kimg, "must be a number of kimg > 0")
        if at_kimg * 1000 > last.cur_nimg:
            raise InvalidSetting("at_kimg", at_kimg, f"beyond the last EMA snapshot of {path} ({last.path.name}, "
                                 f"{last.cur_nimg / 1000:g} kimg)")
        nimg = max(1, round(at_kimg * 1000 / batch)) * batch  # a whole step
        if nimg < snaps[0].cur_nimg:
            raise InvalidSetting("at_kimg", at_kimg, f"before the first EMA snapshot of {path} "
                                 f"({snaps[0].cur_nimg / 1000:g} kimg)")
    used = [s for s in snaps if s.cur_nimg <= nimg]
    for snap in used:
        if any(p not in snap.stds for p in profiles):
            raise CheckpointError(f"{snap.path}: holds σ_rel {list(snap.stds)}, not all of {list(profiles)} "
                                  "(choose the profiles to combine)", key="profiles")
    t_i = np.array([s.cur_nimg for s in used for _ in profiles], dtype=np.float64)
    g_i = np.array([s.exps[s.stds.index(p)] for s in used for p in profiles])
    cand = _candidates()  # the targets and a scan of σ_rel for the representable range, in one solve
    x, err = solve_coefficients(t_i, g_i, nimg, np.array([std_to_exp(s) for s in (*stds, *cand)]))
    ok = cand[err[len(stds):] <= max_error]
    representable = (round(float(ok.min()), 4), round(float(ok.max()), 4)) if len(ok) else None
    rec = Reconstruction(path, stds, nimg // batch, nimg, used, profiles,
                         {s: x[:, j].reshape(len(used), len(profiles)) for j, s in enumerate(stds)},
                         {s: float(err[j]) for j, s in enumerate(stds)}, representable, float(max_error))
    for s in stds:
        if rec.errors[s] > max_error:
            where = (f"they represent σ_rel in [{representable[0]:g}, {representable[1]:g}]" if representable
                     else "they represent no σ_rel to that accuracy")
            raise InvalidSetting("sigma_rel", s, f"the {len(used)} EMA snapshots of {path} up to {nimg / 1000:g} "
                                 f"kimg (profiles σ_rel {list(profiles)}) represent it only to a relative L² error "
                                 f"of {rec.errors[s]:.3f} in its averaging profile (limit {max_error:g}); {where}")
    return rec


@torch.no_grad()
def reconstruct(rec: Reconstruction, std: float) -> dict[str, torch.Tensor]:
    """The state dict of σ_rel = std: Σ_i Σ_p x_ip · snapshot_i[p], accumulated in float64 one parameter at a time
    (each snapshot is memory-mapped, so memory holds the result and one parameter of each snapshot), stored as
    float32 like every EMA."""
    std = round(float(std), 4)
    if std not in rec.coefficients:
        raise KeyError(f"σ_rel={std} was not planned (planned: {list(rec.stds)})")
    x = rec.coefficients[std]
    readers = [snap.open() for snap in rec.snapshots]
    names = readers[-1].names(rec.profiles[0])
    out = {}
    for name in names:
        acc = None
        for i, reader in enumerate(readers):
            for j, p in enumerate(rec.profiles):
                v = reader.tensor(p, name).double() * float(x[i, j])
                acc = v if acc is None else acc.add_(v)
        out[name] = acc.float()
    return out


def reconstructed_run(rec: Reconstruction, std: float, device="cpu") -> LoadedRun:
    """The reconstructed EMA of σ_rel = std as a loaded run (eval mode, no gradients), as `scm.runs.load_run`
    gives one: for sampling and evaluation without writing a run directory."""
    cfg = read_run_config(rec.run)
    net = build_net(cfg.net)
    missing, unexpected = net.load_state_dict(reconstruct(rec, std), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{rec.run / 'ema-snapshots'}: the snapshots do not match the run's network (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    return LoadedRun(cfg, net.to(device).eval().requires_grad_(False), rec.run / "ema-snapshots", round(float(std), 4),
                     rec.step, RunDir(rec.run).read_latent())


NOTE = """# {name}: post-hoc EMA weights of {source}

Written by `scm ema reconstruct` from the power-function EMA snapshots of `{source}` at {kimg:g} kimg (step {step}):
σ_rel {stds} (EDM2 §3.2, App. C.3). `posthoc-ema.json` lists the snapshots, the coefficients and each σ_rel's
relative L² error of the averaging profile. It holds EMA weights only (no raw weights or optimizer state): sample,
evaluate, distil from it (teacher) or start from it (init); it cannot be resumed. `config.json` is the source's with
ema.stds set to the reconstructed σ_rel (the first is the default).
"""


def save_reconstruction(rec: Reconstruction, out: str | Path) -> Path:
    """Write every planned σ_rel into a new run directory `out`: config.json (the source's, ema.stds = the
    reconstructed σ_rel), latent.json (for a run on latents), checkpoints/<step>/ema.safetensors + state.json,
    checkpoints/latest, posthoc-ema.json and README.md. Built in a temporary folder beside `out` and renamed into
    place: `out` appears complete or not at all. The source run is only read."""
    out, src = Path(out).expanduser(), Path(rec.run)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise RunError(f"{out} already exists and is not empty", key="out")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise RunError(f"{out} is inside the source run {src}, which is never modified", key="out")
    raw = RunDir(src).read_config()
    raw["ema"] = {**raw.get("ema", {}), "stds": list(rec.stds)}
    raw["out"] = str(out)
    cfg = to_dict(from_dict(raw))  # validated
    tensors = {ema_key(s, k): v for s in rec.stds for k, v in reconstruct(rec, s).items()}
    with atomic_folder(out) as tmp:
        target = RunDir(tmp)
        target.write_config(cfg)
        target.write_latent(RunDir(src).read_latent())
        info = rec.describe()
        state = {"step": rec.step, "cur_nimg": rec.cur_nimg, "kimg": rec.cur_nimg / 1000,
                 "posthoc_ema": {k: info[k] for k in ("source", "profiles", "max_error")}}
        target.save(rec.step, {"ema": tensors}, state, keep=1)
        atomic_write_json(tmp / "posthoc-ema.json", info)
        atomic_write(tmp / "README.md", NOTE.format(name=out.name, source=src, kimg=rec.cur_nimg / 1000,
                                                    step=rec.step, stds=", ".join(f"{s:g}" for s in rec.stds)))
    return out
