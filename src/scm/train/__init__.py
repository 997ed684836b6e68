"""The training engine: `train(cfg)` runs a diffusion, sCT or sCD run described by a TrainConfig.

Imported lazily, so that `scm.train.checkpoint` (used by `scm.runs`) does not pull in the loop."""

__all__ = ["RunError", "TrainResult", "TrainingStopped", "train"]


def __getattr__(name):
    if name in __all__:
        from scm.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'scm.train' has no attribute {name!r}")
