"""The run directory: what training writes and what inference, teachers and initializations read.

    RUN/config.json                  the resolved TrainConfig
    RUN/latent.json                  for a run on latents: the data's meta["latent"] (VAE, normalisation), to decode
    RUN/media.json                   for a video or audio run: the data's modality and timing ({"modality": "video",
                                     "fps", "frames", "stride"} or {"modality": "audio", "sample_rate"}), so that
                                     samples are written at the data's frame or sample rate
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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from scm.config import TrainConfig, from_dict
from scm.errors import CheckpointError, ConfigError, UnverifiedWarning
from scm.files import atomic_folder, atomic_write, atomic_write_json, durable_rename
from scm.integrity import (
    check_finite,
    one_unverified_warning,
    read_header,
    read_tensors,
    shape_differences,
    verify_digest,
    write_tensors,
)
from scm.nets.registry import build_net

__all__ = ["DEFAULT_SAMPLE_RATE", "EMASnapshot", "LoadedRun", "RunDir", "SnapshotReader", "ema_key", "ema_stds_in",
           "ema_weights", "is_run_dir", "load_run", "load_tensors", "locate_checkpoint", "mix_seed", "network_run",
           "read_run_config", "run_media", "save_tensors", "trained_keys", "weight_shapes", "with_base"]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers: the seed of every generator a run or a sampler uses."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


# -- files ---------------------------------------------------------------------------------------------------------
def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Tensors (moved to the CPU) into a safetensors file carrying its content digest, written atomically; returns
    the digest (`scm.integrity`)."""
    return write_tensors(tensors, path, metadata)


def load_tensors(path: Path, **verify) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, verified before use (`scm.integrity.read_tensors`: record, expect, names)."""
    return read_tensors(path, **verify)


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
            meta = read_header(path).metadata.get(SNAPSHOT_META)
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
        verify_digest(read_header(snap.path))  # its content, before any of it is combined
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
            tensor = self._file.get_tensor(ema_key(std, name))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.snap.path}: cannot read {ema_key(std, name)!r} ({e})") from None
        check_finite({ema_key(std, name): tensor}, self.snap.path)
        return tensor


_SNAPSHOT_NAME = re.compile(r"\d{9,}(-end)?\.safetensors")
_CHECKPOINT_NAME = re.compile(r"\d{1,20}")  # checkpoints/<step>, as `RunDir.save` names them
FILES_KEY = "files"  # state.json: file name → content digest (`scm.integrity`)
T = TypeVar("T")


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
    media_path = property(lambda self: self.path / "media.json")
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

    def read_media(self) -> dict | None:
        """The modality and timing of a video or audio run's data (RUN/media.json), or None where none is recorded
        (images, or a run written before the record existed: `run_media` supplies the defaults)."""
        if not self.media_path.is_file():
            return None
        try:
            info = json.loads(self.media_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.media_path}: corrupt JSON ({e})") from None
        if not isinstance(info, dict) or info.get("modality") not in ("image", "video", "audio"):
            raise CheckpointError(f"{self.media_path}: expected a JSON object with a modality (image, video or "
                                  "audio)")
        return info

    def write_media(self, info: dict | None) -> None:
        """Record the data's modality and timing (None or images: nothing to record, the file is removed)."""
        if info is None or info.get("modality", "image") == "image":
            self.media_path.unlink(missing_ok=True)
        else:
            atomic_write_json(self.media_path, info)

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
        """Complete checkpoints (folders named by their step, with a state.json), oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        done = [p for p in self.ckpt_dir.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
        return sorted((p for p in done if (p / "state.json").is_file()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint `checkpoints/latest` names (else the newest complete one); CheckpointError for a pointer
        that would lead outside the run directory."""
        pointer = self.ckpt_dir / "latest"
        if pointer.is_symlink() or (pointer.exists() and not pointer.is_file()):
            raise CheckpointError(f"{pointer}: not a plain file naming a checkpoint (refused: it could lead outside "
                                  f"the run directory {self.path})")
        if pointer.is_file():
            name = pointer.read_text(errors="replace").strip()
            if not _CHECKPOINT_NAME.fullmatch(name):
                raise CheckpointError(f"{pointer}: names {name[:60]!r}, not a checkpoint of this run (a step "
                                      f"number inside {self.ckpt_dir})")
            candidate = self.ckpt_dir / name
            if (candidate / "state.json").is_file():
                return self._inside(candidate)
        found = self.checkpoints()
        return self._inside(found[-1]) if found else None

    def _inside(self, ckpt: Path) -> Path:
        """`ckpt`, refused when it is a link that leads outside the run directory."""
        if not ckpt.resolve().is_relative_to(self.path.resolve()):
            raise CheckpointError(f"{ckpt}: leads outside the run directory {self.path} (to {ckpt.resolve()}); "
                                  "refused")
        return ckpt

    def save(self, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict, keep: int) -> Path:
        """Write checkpoint <step> atomically, point `latest` at it, keep the newest `keep`. state.json, written
        last, records each file's content digest; weights holding NaN or infinity are refused (CheckpointError),
        so that no checkpoint a reader would refuse ever replaces a good one."""
        for stem, tensors in files.items():
            check_finite(tensors, f"checkpoint {step} ({stem})")
        name = f"{step:09d}"
        with atomic_folder(self.ckpt_dir / name, replace=True) as tmp:
            digests = {f"{stem}.safetensors": save_tensors(tensors, tmp / f"{stem}.safetensors")
                       for stem, tensors in files.items()}
            atomic_write_json(tmp / "state.json", {**state, FILES_KEY: digests})
        atomic_write(self.ckpt_dir / "latest", name + "\n")
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return self.ckpt_dir / name

    def newest_intact(self, load: Callable[[Path], T]) -> tuple[Path | None, T | None, list[tuple[Path, str]]]:
        """The newest checkpoint that `load` reads without a CheckpointError (latest first, then by step), what it
        returned, and the ones skipped with why."""
        first = self.latest()
        order = [first, *(p for p in reversed(self.checkpoints()) if p != first)] if first is not None else []
        skipped = []
        for ckpt in order:
            try:
                return ckpt, load(self._inside(ckpt)), skipped
            except CheckpointError as e:
                skipped.append((ckpt, str(e)))
        return None, None, skipped

    def set_aside(self, ckpt: Path, why: str) -> Path:
        """Rename a damaged checkpoint to <step>.damaged (kept for inspection, with why.txt; never pruned nor read
        again), so that pruning and `latest` see only intact ones."""
        target = ckpt.with_name(f"{ckpt.name}.damaged")
        shutil.rmtree(target, ignore_errors=True)
        durable_rename(ckpt, target)
        atomic_write(target / "why.txt", why + "\n")
        return target

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
    def read_state(ckpt: Path) -> dict:
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint (no state.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{ckpt / 'state.json'}: corrupt JSON ({e})") from None
        if not isinstance(state, dict) or not isinstance(state.get(FILES_KEY, {}), dict):
            raise CheckpointError(f"{ckpt / 'state.json'}: not a checkpoint's state (expected a JSON object with "
                                  f"a {FILES_KEY!r} object)")
        return state

    @staticmethod
    def load(ckpt: Path, stems=("net", "ema", "optim"), expect: dict[str, dict] | None = None,
             names: dict[str, list[str]] | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """A checkpoint's files (each verified against the digest state.json records for it, the tensor shapes
        `expect[stem]` and finite values: `scm.integrity`; only `names[stem]` where given) and its state. A
        checkpoint written before digests were recorded is read unverified, with one UnverifiedWarning."""
        state = RunDir.read_state(ckpt)
        digests = state.get(FILES_KEY)
        with one_unverified_warning(str(ckpt)):
            files = {stem: RunDir._load_file(ckpt, stem, digests, expect, names) for stem in stems}
        return files, state

    @staticmethod
    def _load_file(ckpt: Path, stem: str, digests: dict | None, expect: dict | None, names: dict | None):
        path = ckpt / f"{stem}.safetensors"
        if digests is not None and path.name not in digests:
            raise CheckpointError(f"{path}: not among the files its checkpoint recorded ({', '.join(digests)})")
        if path.is_symlink():
            raise CheckpointError(f"{path}: a link (checkpoint files are plain files inside the run); refused")
        return load_tensors(path, record=None if digests is None else digests[path.name],
                            expect=(expect or {}).get(stem), names=(names or {}).get(stem))


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
    media: dict | None = None   # {"modality", …timing}: `run_media` (RUN/media.json, or defaults)

    def __post_init__(self):
        self.media = run_media(self.cfg, self.media)

    @property
    def modality(self) -> str:
        """"image", "video" or "audio": what the run's samples are."""
        return self.media["modality"]


DEFAULT_SAMPLE_RATE = 16000  # Hz: audio of a run that recorded no rate (written before RUN/media.json existed)


def run_media(cfg: TrainConfig, recorded: dict | None = None) -> dict:
    """A run's modality and timing: what RUN/media.json records (`recorded`), completed from the item shape for a
    run without a record: {"modality": "image"}, video at the nominal `scm.data.modality.DEFAULT_FPS`, audio at
    DEFAULT_SAMPLE_RATE. CheckpointError when the record contradicts the shape (e.g. audio for video items)."""
    modality = {4: "video", 2: "audio"}.get(len(cfg.shape), "image")
    media = dict(recorded or {"modality": modality})
    if media.get("modality") != modality:
        raise CheckpointError(f"media.json records {media.get('modality')!r} data, but the run's items "
                              f"{cfg.shape} are {modality}")
    if modality == "video":
        from scm.data.modality import DEFAULT_FPS

        media = {"fps": DEFAULT_FPS, "frames": cfg.shape[1], "stride": cfg.shape[1], **media}
        if not (isinstance(media["fps"], (int, float)) and media["fps"] > 0):
            raise CheckpointError(f"media.json: fps={media['fps']!r}; must be a number > 0")
    elif modality == "audio":
        media = {"sample_rate": DEFAULT_SAMPLE_RATE, **media}
        rate = media["sample_rate"]
        if isinstance(rate, float) and rate.is_integer():
            rate = media["sample_rate"] = int(rate)
        if not (isinstance(rate, int) and not isinstance(rate, bool) and rate >= 1):
            raise CheckpointError(f"media.json: sample_rate={rate!r}; must be an integer >= 1 (Hz)")
    return media


def read_run_config(path: str | Path) -> TrainConfig:
    run = RunDir(path)
    raw = run.read_config()
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{run.config_path}: not a valid scm configuration ({e})") from None


def network_run(cfg: TrainConfig, weights: dict[str, torch.Tensor], *, source: Path, ema_std: float | None,
                step: int, latent: dict | None = None, device="cpu", net: torch.nn.Module | None = None,
                media: dict | None = None) -> LoadedRun:
    """The run `cfg` describes with `weights` (a checkpoint's, an EMA's, or post-hoc reconstructed ones) loaded into
    its network (`net`, when already built), in eval mode without gradients; CheckpointError naming `source` and
    the first differing tensors when they do not fit."""
    net = with_base(build_net(cfg.net, cfg.loss.sigma_d)) if net is None else net
    keys = trained_keys(net)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()
                if (v.is_floating_point() or k in weights) and (keys is None or k in keys)}
    if diff := shape_differences(expected, {k: tuple(v.shape) for k, v in weights.items()}):
        raise CheckpointError(f"{source}: the weights do not fit the run's network (config.json): {diff}",
                              key="weights")
    net.load_state_dict(weights, strict=False)  # what the EMA keeps: the floating-point entries (all of them here)
    return LoadedRun(cfg, net.to(device).eval().requires_grad_(False), Path(source), ema_std, step, latent, media)


def weight_shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the weights a network's checkpoint holds (the EMA's: its floating-point state, or a
    LoRA student's trained part of it)."""
    keys = trained_keys(net)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()
            if v.is_floating_point() and (keys is None or k in keys)}


def trained_keys(net: torch.nn.Module) -> list[str] | None:
    """The state-dict entries of `net` its checkpoints hold apart from non-float buffers (None: all): a LoRA
    student's adapters and heads (`scm.diffusers.net.DiffusersNet.trained_keys`); its frozen base is read from
    the teacher's folder (`with_base`)."""
    keys = getattr(net, "trained_keys", None)
    return None if keys is None else keys()


def with_base(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with its frozen base weights where it has one (a LoRA student: read from its teacher's folder)."""
    if getattr(getattr(net.cfg, "lora", None), "rank", 0):
        net.load_base()
    return net


def locate_checkpoint(path: str | Path) -> tuple[RunDir, Path | None]:
    """A run directory (its newest checkpoint) or one of its checkpoints (RUN/checkpoints/<step>)."""
    path = Path(path).expanduser()
    if path.parent.name == "checkpoints" and _CHECKPOINT_NAME.fullmatch(path.name) and is_run_dir(path.parent.parent):
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no state.json)")
        return RunDir(path.parent.parent), path
    run = RunDir(path)
    run.read_config()  # a named error for a path that is no run
    return run, run.latest()


def load_run(path: str | Path, ema_std: float | None = None, *, raw: bool = False, device="cpu") -> LoadedRun:
    """A run's newest checkpoint (or the checkpoint `path` names) as an eval-mode network without gradients (and,
    for a run on latents, how to decode its samples). Its files are verified before use (`RunDir.load`); a damaged
    one is a CheckpointError naming it and the newest intact checkpoint.

    ema_std picks the EMA by σ_rel (default: the run's first); raw=True takes the non-averaged weights."""
    run, ckpt = locate_checkpoint(path)
    cfg = read_run_config(run.path)
    if ckpt is None:
        raise CheckpointError(f"{run.path}: the run has no checkpoint yet")
    std = None if raw else cfg.ema.stds[0] if ema_std is None else float(ema_std)
    net = with_base(build_net(cfg.net, cfg.loss.sigma_d))
    shapes, keys = weight_shapes(net), trained_keys(net)
    if raw:
        stem, names = "net", None
        expect = {k: tuple(v.shape) for k, v in net.state_dict().items() if keys is None or k in keys}
    else:
        stem, names, expect = "ema", [ema_key(std, k) for k in shapes], {ema_key(std, k): v for k, v in shapes.items()}
    try:
        if not raw:
            _check_ema_std(ckpt, std)
        files, state = RunDir.load(ckpt, (stem,), expect={stem: expect}, names={stem: names})
    except CheckpointError as e:
        if e.key == "ema_std":
            raise
        raise CheckpointError(f"{e}{_intact_hint(run, ckpt, stem)}", key=e.key) from None
    weights = files[stem] if raw else ema_weights(files[stem], std)
    return network_run(cfg, weights, source=ckpt, ema_std=std, step=int(state.get("step", 0)),
                       latent=run.read_latent(), device=device, net=net, media=run.read_media())


def _check_ema_std(ckpt: Path, std: float) -> None:
    """CheckpointError (key "ema_std") when the checkpoint's EMA file holds no average of σ_rel = std."""
    header = read_header(ckpt / "ema.safetensors")
    stds = sorted({float(k.split("/", 1)[0]) for k in header.tensors if "/" in k})
    if std not in stds:
        raise CheckpointError(f"{ckpt}: no EMA with σ_rel={std} (available: {stds})", key="ema_std")


def _intact_hint(run: RunDir, damaged: Path, stem: str) -> str:
    """'; the newest intact checkpoint is …' (or that there is none), for an error about `damaged`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedWarning)
        for ckpt in reversed(run.checkpoints()):
            try:
                if ckpt != damaged and RunDir.load(ckpt, (stem,)):
                    return f"; the newest intact checkpoint is {ckpt}"
            except CheckpointError:
                continue
    return "; the run has no other intact checkpoint"
