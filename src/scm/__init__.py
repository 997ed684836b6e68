"""scm: continuous-time consistency models (Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", 2024): sCT and sCD training, distillation and 1/2-step sampling."""

from scm import objectives, sampling, tangents, teachers, trigflow

__version__ = "0.1.0"
__all__ = ["objectives", "sampling", "tangents", "teachers", "trigflow"]
