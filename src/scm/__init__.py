"""scm: continuous-time consistency models (Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", 2024): sCT and sCD training, distillation and 1/2-step sampling.

The maths core's modules are attributes of the package (`scm.objectives`, `scm.sampling`, …), imported when first
used, so that `import scm` (and the `scm` command's start, its `--help` included) does not import torch."""

import importlib

__version__ = "0.1.0"
__all__ = ["objectives", "sampling", "tangents", "teachers", "trigflow"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"scm.{name}")
    raise AttributeError(f"module 'scm' has no attribute {name!r}")
