"""Post-hoc EMA (EDM2, Karras et al. 2024, §3.2 and App. C.3): the power-function EMA of any σ_rel, after training,
from the snapshots a run keeps (`ema.snapshot_kimg`, RUN/ema-snapshots/, written by `scm.train.ema.PowerEMA`).

`plan_reconstruction` finds the combination of snapshots whose averaging profile is closest to that of another σ_rel
at a chosen time (the maths, exact for these discrete updates: `scm.ema_profile`), `reconstruct` applies it to the
weights, `reconstructed_run` gives the result as a loaded run (through `scm.runs`, like any checkpoint) and
`save_reconstruction` writes it as a run directory that sampling, evaluation, teachers and initializations read like
any other. `sweep` measures a range of σ_rel with `scm eval`'s metric. An offline tool: it never loads the training
engine (`scm.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scm.config import from_dict, to_dict
from scm.ema_profile import MAX_ERROR, SIGMA_REL_MAX, exp_to_std, solve_coefficients, std_to_exp
from scm.errors import CheckpointError, InvalidSetting, RunError
from scm.evaluate import check_counts, evaluate_setting, open_checked_reference
from scm.files import atomic_folder, atomic_write, atomic_write_json
from scm.integrity import one_unverified_warning
from scm.metrics import seed_interval
from scm.runs import EMASnapshot, LoadedRun, RunDir, ema_key, network_run, read_run_config

__all__ = ["Reconstruction", "default_grid", "plan_reconstruction", "reconstruct", "reconstructed_run",
           "save_reconstruction", "sweep"]

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
    σ_rel must lie in (0, SIGMA_REL_MAX) and be represented to a relative L² error of its averaging profile of at most
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
    with one_unverified_warning(f"{rec.run}/ema-snapshots"):
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
    return network_run(read_run_config(rec.run), reconstruct(rec, std), source=rec.run / "ema-snapshots",
                       ema_std=round(float(std), 4), step=rec.step, latent=RunDir(rec.run).read_latent(), device=device)


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


def default_grid(lo: float, hi: float, count: int = 8) -> list[float]:
    """`count` σ_rel spaced geometrically over [lo, hi], rounded to 3 significant digits."""
    return list(dict.fromkeys(min(max(float(f"{v:.3g}"), lo), hi) for v in np.geomspace(lo, hi, count)))


def sweep(run: str | Path, ref: str, sampler, *, sigma_rels=None, n: int = 1000, seeds=(0,), at_kimg=None,
          max_error: float = MAX_ERROR, metric: str = "fd", inception=None, batch: int = 256, device="cpu",
          log=print) -> dict:
    """The quality (`scm.evaluate`'s metric against `ref`) of the run's EMA for each σ_rel of `sigma_rels` (default:
    8 spread geometrically over the range its snapshots represent within `max_error`), each reconstructed in
    memory and sampled with `sampler` at every sample seed of `seeds`: the mean, the 95 % interval over the seeds
    (`scm.metrics.seed_interval`), each value and the reconstruction's profile error per σ_rel, and the best σ_rel.
    Every σ_rel, the sampler and the reference are checked before anything is generated; the counts and the metric
    before anything is read."""
    check_counts(n, batch, metric)
    if not seeds:
        raise InvalidSetting("seeds", seeds, "give at least one sample seed")
    if sigma_rels is None:
        span = plan_reconstruction(run, [], at_kimg=at_kimg, max_error=max_error).representable
        if span is None:
            raise InvalidSetting("max_error", max_error, f"the EMA snapshots of {run} represent no σ_rel to this "
                                 "relative error of the averaging profile")
        sigma_rels = default_grid(*span)
    rec = plan_reconstruction(run, sigma_rels, at_kimg=at_kimg, max_error=max_error)
    first = reconstructed_run(rec, rec.stds[0], device)
    space, stats = open_checked_reference(first, [sampler], ref, n, metric=metric, inception=inception, log=log)
    rows = []
    for s in rec.stds:
        loaded = first if s == rec.stds[0] else reconstructed_run(rec, s, device)
        values = [float(evaluate_setting(loaded, sampler, space, stats, n, seed=seed, batch=batch)[0][space.metric])
                  for seed in seeds]
        spread = seed_interval(values)
        interval = None if spread.low is None else [spread.low, spread.high]
        rows.append({"sigma_rel": s, space.metric: spread.mean, "std": spread.std, "interval": interval,
                     "values": values, "profile_error": rec.errors[s]})
        log(f"σ_rel {s:g}: {space.metric} {spread.mean:.3f}"
            + (f" (95 % interval {interval[0]:.3f}–{interval[1]:.3f})" if interval else ""))
    finite = [r for r in rows if np.isfinite(r[space.metric])]
    best = min(finite, key=lambda r: r[space.metric]) if finite else None
    return {"run": str(run), "reference": stats.source, "metric": space.metric, "sampler": sampler.describe(first),
            "n": n, "seeds": list(seeds), "kimg": rec.cur_nimg / 1000, "step": rec.step,
            "snapshots": len(rec.snapshots), "profiles": list(rec.profiles), "representable": rec.representable,
            "max_error": rec.max_error, "rows": rows,
            "best": best and {"sigma_rel": best["sigma_rel"], space.metric: best[space.metric]}}
