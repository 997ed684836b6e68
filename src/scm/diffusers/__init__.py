"""Interoperability with diffusers (optional extra): its models as TrigFlow teachers and students, and scm runs
exported as diffusers pipelines. This is the package's public API (`from scm.diffusers import SCMPipeline`): its
names are imported lazily from the modules below, so `import scm.diffusers` works without diffusers."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Parameterization": "convert", "call_model": "convert", "data_scale": "convert",
    "from_diffusers": "teacher", "load_diffusers": "teacher", "read_diffusers": "teacher",
    "DiffusersNet": "net", "student_config": "net", "student_from_diffusers": "net", "DiffusersNetConfig": "net_config",
    "enable_jvp": "jvp", "ExactAttention": "jvp",
    "SCMModel": "pipeline", "SCMPipeline": "pipeline", "SCMTextEncoder": "pipeline", "export_diffusers": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"scm.diffusers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'scm.diffusers' has no attribute {name!r}")
