"""The training engine: `train(cfg)` runs a diffusion, sCT or sCD run described by a TrainConfig.

Inference (scm.runs, scm.generate, scm.posthoc) never imports this package; this package imports them. Its public
API (`train`, `TrainState`, `train_step`) is re-exported here; `scm.train.resolve` settles a run's configuration."""

from scm.train.loop import TrainResult, train
from scm.train.state import TrainState
from scm.train.step import train_step

__all__ = ["TrainResult", "TrainState", "train", "train_step"]
