"""The training engine: `train(cfg)` runs a diffusion, sCT or sCD run described by a TrainConfig."""

from scm.train.loop import RunError, TrainingStopped, TrainResult, train

__all__ = ["RunError", "TrainResult", "TrainingStopped", "train"]
