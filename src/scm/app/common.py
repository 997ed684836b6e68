"""What every `scm` command shares: how a library error is worded for a person (the flag at fault first, a hint
on how to fix it last), and the small argument helpers (a run to load, a list of times, a writable --out). The
commands (`scm.app.cli`, `scm.app.ema_cli`) import from here; nothing here imports a command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from scm.errors import ScmError

__all__ = ["DATA_FLAGS", "DATA_HINTS", "FLAGS", "HINTS", "USER_ERRORS", "device_of", "fail", "fail_on", "load",
           "parse_times", "read_prompts", "writable_folder", "writable_later"]

# The library names the setting at fault (ScmError.key); here is how a person sets it on the command line.
FLAGS = {"steps": "--steps", "nfe": "--nfe", "ts": "--ts", "t_mid": "--t-mid", "solver": "--solver",
         "class_label": "--class", "guidance": "--guidance", "n": "--n", "batch": "--batch", "ema_std": "--ema",
         "metric": "--metric", "method": "--method", "preset": "--preset", "resume": "--resume", "out": "--out",
         "prompt": "--prompt", "teacher": "--teacher", "inception": "--inception", "device": "--device"}
HINTS = {"out": "continue it with --resume, or choose another --out", "method": "pick one with --method",
         "preset": "`scm presets` lists them", "mnist": "run `scm data fetch mnist`",
         "moving-mnist": "run `scm data fetch moving-mnist`",
         "moving-mnist-tiny": "run `scm data fetch moving-mnist-tiny`",
         "inception": "pass --inception PATH or set SCM_INCEPTION_WEIGHTS (README, 'Metrics')"}

# the data commands' settings and hints (over FLAGS / HINTS)
DATA_FLAGS = {"src": "--data", "data": "--data", "out": "--out", "resolution": "--resolution", "channels": "--channels",
              "alpha": "--alpha", "vae": "--vae", "dtype": "--dtype", "normalization": "--normalization",
              "which": "--sample", "batch": "--batch", "modality": "--modality", "frames": "--frames",
              "stride": "--stride", "fps": "--fps", "sample_rate": "--sample-rate", "length": "--length"}
DATA_HINTS = {"out": "choose another --out, or remove it", "skip_bad": "--skip-bad skips such files (and lists them "
              "in meta.json)"}


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def fail_on(e: Exception, flags: dict | None = None, hints: dict | None = None):
    """Word a library error for the command line: the flag at fault first, a hint on how to fix it last
    (`flags`/`hints`: a command's own words, over the common ones)."""
    flags, hints = {**FLAGS, **(flags or {})}, {**HINTS, **(hints or {})}
    msg, key = str(e), getattr(e, "key", None)
    if key in flags and msg.startswith(f"{key}="):  # "steps=0: …" → "--steps 0: …"
        msg = f"{flags[key]} {msg[len(key) + 1:]}"
    elif key in flags:
        msg = f"{flags[key]}: {msg}"
    if hints.get(key):
        msg = f"{msg}; {hints[key]}"
    fail(msg)


USER_ERRORS = (ScmError, FileNotFoundError)


def device_of(spec: str):
    """The --device setting as a torch.device (a device this machine lacks is an error exit)."""
    from scm.devices import resolve_device

    try:
        return resolve_device(spec)
    except ScmError as e:
        fail_on(e)


def load(ckpt: str, ema: float | None, raw: bool, device: str):
    """The run --ckpt names (its EMA --ema, or --raw weights) on --device."""
    from scm.runs import load_run

    return load_run(ckpt, ema, raw=raw, device=device_of(device))


def parse_times(text: str | None):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"--ts {text!r}: expected comma-separated times in radians, e.g. 1.5645,1.1")


def writable_later(out: str, folder: Path) -> Path:
    """Check that `folder` (where --out OUT will write) can be made and written, without making it: a command that
    fails before its results leaves nothing behind."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        fail(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--out {out}: {existing} is not writable")
    return folder


def writable_folder(out: str, folder: Path) -> Path:
    """Make `folder` (where --out OUT writes) and check that it is writable, before anything is computed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create {folder} ({e.strerror or e})")
    if not os.access(folder, os.W_OK):
        fail(f"--out {out}: {folder} is not writable")
    return folder




def read_prompts(prompt: list[str] | None, prompts_file: str | None, per_prompt: int | None) -> list[str] | None:
    """The prompts of --prompt (repeated) and --prompts FILE (UTF-8, one per non-empty line), each repeated
    --n-per-prompt times in order; None when none is given. Bad input is an error exit naming the flag."""
    asked = list(prompt or [])
    if prompts_file is not None:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompts {prompts_file}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})")
        asked += [line.strip() for line in text.splitlines() if line.strip()]
        if not asked:
            fail(f"--prompts {prompts_file}: holds no prompt (one per line)")
    if per_prompt is not None:
        if per_prompt < 1:
            fail(f"--n-per-prompt {per_prompt}: must be >= 1")
        if not asked:
            fail("--n-per-prompt: give --prompt or --prompts")
        asked = [p for p in asked for _ in range(per_prompt)]
    if not asked:
        return None
    from scm.text import check_prompts

    try:
        return check_prompts(asked)
    except ScmError as e:
        fail_on(e)
