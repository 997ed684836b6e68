"""Every network scm can train, by preset name: the U-Net presets (`tiny`, `cifar`, `S` … `XXL`), the
transformer presets (`dit-tiny`, `DiT-S/2` … `DiT-XL/2`) and `diffusers`, a diffusers teacher's own network as a
student (`scm.diffusers.net`; its config names the diffusers class and holds its config, so it needs diffusers to
build but not the teacher's folder). A run records its `net_preset` and its network's resolved config; the preset's
architecture says which config class and network that config builds."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from scm.diffusers.net_config import DiffusersNetConfig
from scm.nets.dit import DIT_PRESETS, DiT, DiTConfig
from scm.nets.unet import NET_PRESETS as UNET_PRESETS
from scm.nets.unet import UNet, UNetConfig

__all__ = ["ARCHITECTURES", "NET_PRESETS", "NetConfig", "build_net", "config_class", "net_config"]

NetConfig = UNetConfig | DiTConfig | DiffusersNetConfig


def _diffusers_net(cfg: DiffusersNetConfig) -> nn.Module:
    """scm.diffusers.net.DiffusersNet(cfg), imported on use (it imports scm.nets itself)."""
    from scm.diffusers.net import DiffusersNet

    return DiffusersNet(cfg)


# architecture name → (config class, network class or factory, its presets)
ARCHITECTURES: dict[str, tuple[type, Callable[..., nn.Module], dict[str, dict]]] = {
    "unet": (UNetConfig, UNet, UNET_PRESETS),
    "dit": (DiTConfig, DiT, DIT_PRESETS),
    "diffusers": (DiffusersNetConfig, _diffusers_net, {"diffusers": {}}),  # from a teacher: student_from_diffusers
}

# preset name → architecture name
NET_PRESETS: dict[str, str] = {name: arch for arch, (_, _, presets) in ARCHITECTURES.items() for name in presets}


def _arch(preset: str) -> str:
    if preset not in NET_PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; known: {', '.join(NET_PRESETS)}")
    return NET_PRESETS[preset]


def config_class(preset: str) -> type:
    """The config class (UNetConfig, DiTConfig or DiffusersNetConfig) of a network preset."""
    return ARCHITECTURES[_arch(preset)][0]


def net_config(preset: str, **fields) -> NetConfig:
    """A network preset's config with `fields` (img_resolution, img_channels, …) set over it."""
    cls, _, presets = ARCHITECTURES[_arch(preset)]
    return cls(**{**presets[preset], **fields})


def build_net(cfg: NetConfig) -> nn.Module:
    """The network a config describes (a fresh initialization)."""
    for cls, net_cls, _ in ARCHITECTURES.values():
        if type(cfg) is cls:
            return net_cls(cfg)
    raise TypeError(f"not a network config: {type(cfg).__name__}")

