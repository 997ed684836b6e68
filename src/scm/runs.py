"""The run directory: what training writes and what inference, teachers and initializations read.

    RUN/config.json                  the resolved TrainConfig
    RUN/latent.json                  for a run on latents: the data's meta["latent"] (VAE, normalisation), to decode
    RUN/teacher.json                 for sCD from a diffusers model: its parameterisation, the data convention, σ_d
                                     and the training data's measured std (scm.diffusers)
    RUN/metrics.jsonl                one JSON line per log interval
    RUN/samples/                     sample grids at fixed seeds
    RUN/checkpoints/<step>/          net.safetensors, ema.safetensors, optim.safetensors, state.json
    RUN/checkpoints/latest           the name of the newest complete checkpoint
    RUN/ema-snapshots/<step>.safetensors      post-hoc EMA: every σ_rel's average at each multiple of
                                              ema.snapshot_kimg, with its image count and exponents (metadata)
    RUN/ema-snapshots/<step>-end.safetensors  … and at the last step of a training session (superseded by the
                                              next snapshot when the run is resumed)

A checkpoint is built in a temporary folder, fsynced and renamed into place, and `latest` is replaced the same
way (`scm.files`, the one atomic writer): a crash at any moment leaves the previous checkpoint intact and loadable.
Tensors go to safetensors, everything else to JSON; nothing is ever unpickled. The EMA file holds one set of
weights per σ_rel under keys "<σ_rel:.4f>/<parameter>". Random numbers are functions of seeds mixed by
`mix_seed`. This module is the only one that knows these formats; it imports nothing of the training engine.

EMA snapshots (EDM2 §3.2, read by `scm.posthoc`) are written atomically too, with the keys of the EMA
file and a JSON header under the safetensors metadata key "scm_ema_snapshot" (step, cur_nimg, batch, stds, exps = γ
per σ_rel, snapshot_kimg, end). Checkpoint pruning never touches them. The set a run ends with depends only on how
far it trained, never on how often it was stopped and resumed: a resumed run drops those past the checkpoint it
continues from (they are written again, before the checkpoint of their step), and its next snapshot replaces the
end-of-session one (a straight run has none there).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from scm.config import TrainConfig, from_dict
from scm.errors import CheckpointError, ConfigError
from scm.files import atomic_folder, atomic_write, atomic_write_json
from scm.nets.registry import build_net

__all__ = ["EMASnapshot", "LoadedRun", "RunDir", "SnapshotReader", "ema_key", "ema_stds_in", "ema_weights",
           "is_run_dir", "load_run", "load_tensors", "mix_seed", "network_run", "read_run_config", "save_tensors"]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers: the seed of every generator a run or a sampler uses."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


# -- files ---------------------------------------------------------------------------------------------------------
def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Tensors (moved to the CPU) into a safetensors file, written atomically (`scm.files`)."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


# -- EMA weights -----------------------------------------------------------------------------------------------------
def ema_key(std: float, name: str) -> str:
    return f"{float(std):.4f}/{name}"


def ema_stds_in(tensors: dict[str, torch.Tensor]) -> list[float]:
    """The σ_rel values present in an EMA file (keys '<σ_rel>/<name>')."""
    return sorted({float(k.split("/", 1)[0]) for k in tensors})


def ema_weights(tensors: dict[str, torch.Tensor], std: float | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the EMA with σ_rel = std (default: the smallest in the file)."""
    stds = ema_stds_in(tensors)
    if not stds:
        raise KeyError("the checkpoint holds no EMA weights")
    std = stds[0] if std is None else float(std)
    if std not in stds:
        raise KeyError(f"no EMA with σ_rel={std} (available: {stds})")
    prefix = ema_key(std, "")
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# -- EMA snapshots ---------------------------------------------------------------------------------------------------
SNAPSHOT_META = "scm_ema_snapshot"


@dataclass(frozen=True)
class EMASnapshot:
    """A snapshot file's header: when it was taken and the profiles it holds (σ_rel and γ, in the same order)."""

    path: Path
    step: int
    cur_nimg: int              # training images seen: the time t_i of the profile τ^γ on [0, t_i]
    batch: int                 # images per step (Δ of the EMA's updates)
    stds: tuple[float, ...]
    exps: tuple[float, ...]
    end: bool                  # taken at the last step of a training session (not on the snapshot_kimg grid)

    @classmethod
    def read(cls, path: Path) -> EMASnapshot:
        try:
            with safe_open(str(path), "pt") as f:
                meta = (f.metadata() or {}).get(SNAPSHOT_META)
            info = json.loads(meta) if meta is not None else None
            snap = cls(Path(path), int(info["step"]), int(info["cur_nimg"]), int(info["batch"]),
                       tuple(float(s) for s in info["stds"]),
                       tuple(float(g) for g in info["exps"]), bool(info["end"]))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or unreadable EMA snapshot ({e})") from None
        except (TypeError, KeyError):
            raise CheckpointError(f"{path}: not a scm EMA snapshot (no valid {SNAPSHOT_META!r} header)") from None
        if not (snap.cur_nimg > 0 and snap.batch > 0 and snap.stds and len(snap.stds) == len(snap.exps)):
            raise CheckpointError(f"{path}: EMA snapshot with an invalid header (cur_nimg {snap.cur_nimg}, batch "
                                  f"{snap.batch}, stds {snap.stds}, exps {snap.exps})")
        return snap

    def open(self) -> SnapshotReader:
        return SnapshotReader(self)


class SnapshotReader:
    """A snapshot's tensors, read one at a time (memory-mapped), so that combining many snapshots holds one
    parameter of each at once."""

    def __init__(self, snap: EMASnapshot):
        self.snap = snap
        try:
            self._file = safe_open(str(snap.path), "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{snap.path}: corrupt or unreadable EMA snapshot ({e})") from None

    def names(self, std: float) -> list[str]:
        """The parameter names of the profile σ_rel = std."""
        prefix, keys = ema_key(std, ""), self._file.keys()  # (a safetensors handle is not iterable)
        return [k[len(prefix):] for k in keys if k.startswith(prefix)]

    def tensor(self, std: float, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(ema_key(std, name))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.snap.path}: cannot read {ema_key(std, name)!r} ({e})") from None


_SNAPSHOT_NAME = re.compile(r"\d{9,}(-end)?\.safetensors")


def _snapshot_step(path: Path) -> int:
    return int(path.name.split(".", 1)[0].removesuffix("-end"))


# -- the directory ---------------------------------------------------------------------------------------------------
class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    samples_dir = property(lambda self: self.path / "samples")
    ckpt_dir = property(lambda self: self.path / "checkpoints")
    latent_path = property(lambda self: self.path / "latent.json")
    teacher_path = property(lambda self: self.path / "teacher.json")
    snapshots_dir = property(lambda self: self.path / "ema-snapshots")

    def read_config(self) -> dict:
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such run directory")
        try:
            return json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: not a scm run directory (no config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.config_path}: corrupt JSON ({e})") from None

    def write_config(self, cfg: dict) -> None:
        atomic_write_json(self.config_path, cfg)

    def read_latent(self) -> dict | None:
        """How the run's data were encoded (`scm.data.latents`), or None for a run on pixels."""
        if not self.latent_path.is_file():
            return None
        try:
            info = json.loads(self.latent_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.latent_path}: corrupt JSON ({e})") from None
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.latent_path}: expected a JSON object")
        return info

    def write_teacher(self, info: dict) -> None:
        """Record what a run learnt about its teacher (RUN/teacher.json)."""
        atomic_write_json(self.teacher_path, info)

    def write_latent(self, info: dict | None) -> None:
        """Record the data's latent information (None: pixels, the file is removed)."""
        if info is None:
            self.latent_path.unlink(missing_ok=True)
        else:
            atomic_write_json(self.latent_path, info)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (those with a state.json), oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        done = [p for p in self.ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted((p for p in done if (p / "state.json").is_file()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if pointer.is_file():
            candidate = self.ckpt_dir / pointer.read_text().strip()
            if (candidate / "state.json").is_file():
                return candidate
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict, keep: int) -> Path:
        """Write checkpoint <step> atomically, point `latest` at it, keep the newest `keep`."""
        name = f"{step:09d}"
        with atomic_folder(self.ckpt_dir / name, replace=True) as tmp:
            for stem, tensors in files.items():
                save_tensors(tensors, tmp / f"{stem}.safetensors")
            atomic_write_json(tmp / "state.json", state)
        atomic_write(self.ckpt_dir / "latest", name + "\n")
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return self.ckpt_dir / name

    def clean_partial(self) -> None:
        """Remove temporary folders and files left by a crash during a checkpoint or snapshot write."""
        if self.ckpt_dir.is_dir():
            for p in [*self.ckpt_dir.glob(".*.tmp-*"), *self.ckpt_dir.glob(".tmp-*")]:
                shutil.rmtree(p, ignore_errors=True)
        if self.snapshots_dir.is_dir():
            for p in self.snapshots_dir.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)

    # -- EMA snapshots (post-hoc EMA) --------------------------------------------------------------------------------
    def _snapshot_files(self) -> list[Path]:
        if not self.snapshots_dir.is_dir():
            return []
        found = (p for p in self.snapshots_dir.iterdir() if _SNAPSHOT_NAME.fullmatch(p.name))
        return sorted(found, key=lambda p: (_snapshot_step(p), p.name))

    def save_ema_snapshot(self, step: int, tensors: dict[str, torch.Tensor], info: dict, *, end: bool) -> Path:
        """Write snapshot <step> atomically (`info`: cur_nimg, batch, stds, exps, …, into its header); it
        supersedes the end-of-session snapshots taken before it."""
        path = self.snapshots_dir / f"{step:09d}{'-end' if end else ''}.safetensors"
        save_tensors(tensors, path, metadata={SNAPSHOT_META: json.dumps({**info, "step": step, "end": end})})
        for old in self._snapshot_files():
            if old.name.endswith("-end.safetensors") and _snapshot_step(old) < step:
                old.unlink(missing_ok=True)
        return path

    def ema_snapshots(self) -> list[EMASnapshot]:
        """The run's EMA snapshots, oldest first (headers only; a corrupt file is a CheckpointError naming it)."""
        return [EMASnapshot.read(p) for p in self._snapshot_files()]

    def truncate_snapshots(self, after_step: int) -> None:
        """Drop the snapshots past `after_step` (a resumed run writes them again from the checkpoint on)."""
        for p in self._snapshot_files():
            if _snapshot_step(p) > after_step:
                p.unlink(missing_ok=True)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past `after_step` (written after the checkpoint a resumed run continues from)."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
        atomic_write(self.metrics_path, "".join(f"{line}\n" for line in keep))

    @staticmethod
    def step_of(ckpt: Path) -> int:
        """The step a checkpoint was written at (its folder's name)."""
        return int(ckpt.name)

    @staticmethod
    def load(ckpt: Path, stems=("net", "ema", "optim")) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint (no state.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{ckpt / 'state.json'}: corrupt JSON ({e})") from None
        return {s: load_tensors(ckpt / f"{s}.safetensors") for s in stems}, state


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


# -- reading a trained run -------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    cfg: TrainConfig
    net: torch.nn.Module
    checkpoint: Path
    ema_std: float | None      # None: raw (non-averaged) weights
    step: int
    latent: dict | None = None  # a run on latents: how to decode its samples (RUN/latent.json)


def read_run_config(path: str | Path) -> TrainConfig:
    run = RunDir(path)
    raw = run.read_config()
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{run.config_path}: not a valid scm configuration ({e})") from None


def network_run(cfg: TrainConfig, weights: dict[str, torch.Tensor], *, source: Path, ema_std: float | None,
                step: int, latent: dict | None = None, device="cpu") -> LoadedRun:
    """The run `cfg` describes with `weights` (a checkpoint's, an EMA's, or post-hoc reconstructed ones) loaded into
    its network, in eval mode without gradients; CheckpointError naming `source` when they do not fit."""
    net = build_net(cfg.net, cfg.loss.sigma_d)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the run's network (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return LoadedRun(cfg, net.to(device).eval().requires_grad_(False), Path(source), ema_std, step, latent)


def load_run(path: str | Path, ema_std: float | None = None, *, raw: bool = False, device="cpu") -> LoadedRun:
    """The newest checkpoint of a run as an eval-mode network without gradients (and, for a run on latents,
    how to decode its samples).

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
            raise CheckpointError(f"{ckpt}: no EMA with σ_rel={std} (available: {ema_stds_in(tensors)})",
                                  key="ema_std") from None
    try:
        step = int(json.loads((ckpt / "state.json").read_text()).get("step", 0))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: corrupt JSON ({e})") from None
    return network_run(cfg, weights, source=ckpt, ema_std=std, step=step, latent=run.read_latent(), device=device)
