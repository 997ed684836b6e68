"""Run directories and atomic, pickle-free checkpoints.

    RUN/config.json                  resolved TrainConfig
    RUN/metrics.jsonl                one JSON line per log interval
    RUN/samples/                     sample grids at fixed seeds
    RUN/checkpoints/<step>/          net.safetensors, ema.safetensors, optim.safetensors, state.json
    RUN/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into a temporary folder (each file fsynced, state.json last), then renamed into
place and `latest` is replaced by rename: a crash at any moment leaves the previous checkpoint intact and
loadable. Tensors go to safetensors, everything else to JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "RunDir", "atomic_write_text"]


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt run directory or checkpoint; the message names the path."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically: temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    samples_dir = property(lambda self: self.path / "samples")
    ckpt_dir = property(lambda self: self.path / "checkpoints")

    def read_config(self) -> dict:
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such run directory")
        try:
            return json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: not a scm run directory (no config.json)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.config_path}: corrupt JSON ({e})") from None

    def write_config(self, cfg: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(cfg, indent=2) + "\n")

    # -- checkpoints -------------------------------------------------------------------------------------------
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
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        name = f"{step:09d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for stem, tensors in files.items():
            _save_tensors(tensors, tmp / f"{stem}.safetensors")
        delay = float(os.environ.get("SCM_TEST_CHECKPOINT_DELAY", "0"))  # fault-injection hook for the tests
        if delay:
            time.sleep(delay)
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=2) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.ckpt_dir)
        atomic_write_text(self.ckpt_dir / "latest", name + "\n")
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def clean_partial(self) -> None:
        """Remove temporary folders left by a crash during a checkpoint write."""
        if self.ckpt_dir.is_dir():
            for p in self.ckpt_dir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def load(ckpt: Path, stems=("net", "ema", "optim")) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint (no state.json)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{ckpt / 'state.json'}: corrupt JSON ({e})") from None
        return {s: load_tensors(ckpt / f"{s}.safetensors") for s in stems}, state
