"""The errors scm raises for problems a user can fix, under one base class.

Every message is one line that names the file, key or value at fault, in the library's own words (no command-line
flags: the application says how to fix a thing in its terms). `key`, where set, is the setting at fault as the
library names it (`"steps"`, `"loss.P_std"`, `"class_label"`, `"resume"`), so an application can point at its
own spelling of that setting.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InceptionError",
    "InvalidSetting",
    "MissingDependency",
    "RunError",
    "SamplerError",
    "ScmError",
    "ScmWarning",
    "TrainingStopped",
    "UnverifiedWarning",
    "require_modules",
]


class ScmError(Exception):
    """Base class: a problem with the user's input, files or run, described in one line."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


class InvalidSetting(ScmError, ValueError):
    """A bad argument of a library class (objective, sampler …); `key` is the argument's name."""

    def __init__(self, key: str, value, reason: str):
        super().__init__(f"{key}={value!r}: {reason}", key=key)
        self.value, self.reason = value, reason


class ConfigError(ScmError, ValueError):
    """A bad preset, configuration key or value; the message names it."""


class DataError(ScmError, ValueError):
    """Missing, empty, corrupt or inconsistent data; the message names the file or field."""


class CheckpointError(ScmError, RuntimeError):
    """A missing, incomplete or corrupt run directory or checkpoint; the message names the path."""


class RunError(ScmError, RuntimeError):
    """A run directory that cannot be used as asked (it holds another run, or another configuration)."""


class SamplerError(ScmError, ValueError):
    """A sampler setting that does not fit the model (steps for a diffusion run, an unknown class …)."""


class InceptionError(ScmError, ValueError):
    """The FID Inception weights are missing or are not the expected file."""


class MissingDependency(ScmError, ImportError):
    """An optional dependency is not installed; `extra` names the `pip install scm[<extra>]` that provides it."""

    def __init__(self, message: str, *, extra: str, key: str | None = None):
        super().__init__(message, key=key)
        self.extra = extra


def require_modules(purpose: str, extra: str, *modules: str) -> list:
    """Import optional dependencies, or raise MissingDependency saying what needs them and which extra provides
    them: `require_modules("latent space", "latent", "diffusers")`."""
    import importlib

    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise MissingDependency(f"{purpose} needs {' and '.join(modules)}, which is not installed ({e}): "
                                f"pip install scm[{extra}]", extra=extra) from None


class TrainingStopped(ScmError, RuntimeError):
    """Training stopped early with a checkpoint saved: interrupted (`reason="interrupted"`), too many
    consecutive non-finite steps (`reason="diverged"`), or a peer process of a distributed run stopped or stopped
    answering (`reason="peer"`: the last checkpoint is the one to resume from)."""

    def __init__(self, message: str, *, reason: str, checkpoint=None):
        super().__init__(message)
        self.reason, self.checkpoint = reason, checkpoint


class ScmWarning(UserWarning):
    """Something a user should know that does not stop the work (the command line prints it as one line)."""


class UnverifiedWarning(ScmWarning):
    """A file read without a content digest to check it against (written before scm recorded them)."""
