"""The configuration of a diffusers network as an sCM student (`scm.diffusers.net.DiffusersNet`): plain data, importable
without diffusers and without `scm.nets` (the network registry finds it by name), so that a run's config.json names
and rebuilds the network."""

from __future__ import annotations

from dataclasses import dataclass, field

from scm._checks import sizes
from scm.diffusers.convert import DATA_CONVENTIONS
from scm.errors import ConfigError
from scm.lora_config import LoRAConfig

__all__ = ["SUPPORTED_MODELS", "DiffusersNetConfig", "LoRAConfig"]

# the classes of scm.diffusers.families (a test checks the two agree)
SUPPORTED_MODELS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
                    "SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel")

@dataclass
class DiffusersNetConfig:
    """A diffusers network as an scm student (one line a field). `model_class` "" is a placeholder (a preset before
    its teacher is known); a network is built only from a config that names its model (`student_from_diffusers`)."""

    model_class: str = ""                               # one of SUPPORTED_MODELS
    model_config: dict = field(default_factory=dict)    # its diffusers config (keys without a leading "_")
    scheduler_class: str = ""                           # the teacher's training scheduler: its parameterisation
    scheduler_config: dict = field(default_factory=dict)
    data: str = "own"                                   # "own" | "unit" (scm.diffusers.convert)
    img_resolution: int | tuple[int, int] = 32         # R (R×R inputs) or (H, W)
    img_channels: int = 4
    label_dim: int = 0                                  # classes of scm's labels (<= the model's; 0: none)
    null_label: int | None = None                       # its "no class" index (None: the model's own, if any)
    text_dim: int = 0                                   # width of the prompt tokens it takes (0: no prompts)
    text_pooled_dim: int = 0                            # width of the pooled prompt embedding it takes (0: none)
    guidance_embed: bool = False                        # take a guidance-scale input (sCD with CFG, §5.2)
    label_dropout: float = 0.0                          # drop labels with this probability in training (CFG)
    checkpointing: bool = False                         # the model's own gradient checkpointing (per block)
    dropout: float = 0.0                                # p of every dropout layer of the diffusers model
    embed_channels: int = 256                           # positional embedding of the guidance scale
    weight_channels: int = 128                          # embedding width of the adaptive-weight head w_φ(t)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # low-rank adapters (rank 0: the whole network trains)
    lora_base: str = ""                                 # a LoRA student's frozen base weights: "diffusers:PATH"

    def __post_init__(self):
        if self.model_class and self.model_class not in SUPPORTED_MODELS:
            raise ConfigError(f"{self.model_class} is not a network scm can train as a student (supported: "
                              f"{', '.join(SUPPORTED_MODELS)})", key="model_class")
        for name in ("model_config", "scheduler_config"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"DiffusersNetConfig.{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.data not in DATA_CONVENTIONS:
            raise ValueError(f"DiffusersNetConfig.data must be one of {DATA_CONVENTIONS}, got {self.data!r}")
        if isinstance(self.lora, dict):  # from keyword arguments (SCMModel's config.json)
            self.lora = LoRAConfig(**self.lora)
        if not isinstance(self.img_resolution, int):
            self.img_resolution = tuple(self.img_resolution)
        sizes(self.img_resolution, "img_resolution")
        for name in ("text_dim", "text_pooled_dim"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"DiffusersNetConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("img_channels", "embed_channels", "weight_channels"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"DiffusersNetConfig.{name} must be a positive int, got {v!r}")
        for name in ("embed_channels", "weight_channels"):
            if getattr(self, name) % 2:
                raise ValueError(f"DiffusersNetConfig.{name} must be even, got {getattr(self, name)}")
        if not (isinstance(self.label_dim, int) and self.label_dim >= 0):
            raise ValueError(f"DiffusersNetConfig.label_dim must be an int >= 0, got {self.label_dim!r}")
        for name in ("dropout", "label_dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"DiffusersNetConfig.{name} must lie in [0, 1), got {v!r}")

    @property
    def img_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the network's input and output."""
        return (self.img_channels, *sizes(self.img_resolution, "img_resolution"))
