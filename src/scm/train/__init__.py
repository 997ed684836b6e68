"""The training engine: `train(cfg)` runs a diffusion, sCT or sCD run described by a TrainConfig.

Inference (scm.runs, scm.generate) never imports this package; this package imports them."""

from scm.train.loop import TrainResult, train
from scm.train.state import TrainState
from scm.train.step import train_step

__all__ = ["TrainResult", "TrainState", "train", "train_step"]
