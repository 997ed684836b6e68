"""Every network scm can train, by preset name: the U-Net presets (`tiny`, `cifar`, `S` … `XXL`), the
transformer presets (`dit-tiny`, `DiT-S/2` … `DiT-XL/2`), the video transformer's (`video-tiny`, `video-S`,
`video-B`: clips [C, T, H, W]), the audio transformer's (`audio-tiny`, `audio-B`: waveforms [C, L]) and
`diffusers`, a diffusers teacher's own network as a student (`scm.diffusers.net`; its config names the diffusers
class and holds its config, so it needs diffusers to build but not the teacher's folder). A run records its
`net_preset` and its network's resolved config; the preset's architecture says which config class and network that
config builds.

An architecture names its config class and network as "module:Class" and is imported on first use: the registry
imports scm's own networks only, never the diffusers interop (`scm.diffusers`), which a run of another architecture
never loads. A network is built as `Class(cfg, sigma_d)`: σ_d is the run's (`loss.sigma_d`), not the network's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from scm.nets.audio import AUDIO_PRESETS
from scm.nets.dit import DIT_PRESETS
from scm.nets.unet import UNET_PRESETS
from scm.nets.video import VIDEO_PRESETS

__all__ = ["ARCHITECTURES", "NET_PRESETS", "Architecture", "NetConfig", "build_net", "config_class", "net_config"]


class NetConfig(Protocol):
    """What every network config has (`scm.nets.unet.UNetConfig`, `scm.nets.dit.DiTConfig`,
    `scm.nets.video.VideoConfig`, `scm.nets.audio.AudioConfig`, `scm.diffusers.net_config.DiffusersNetConfig`): its
    input's shape (`img_shape`: (C, H, W) for images, (C, T, H, W) for video with `frames`, (C, L) for audio with
    `length`; an audio config does not use `img_resolution`), its classes and guidance input."""

    img_resolution: int | tuple[int, int]
    img_channels: int
    label_dim: int
    guidance_embed: bool

    @property
    def img_shape(self) -> tuple[int, ...]: ...


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Architecture:
    """A family of networks: its config class and network ("module:Class", imported on use) and its presets."""

    config: str
    network: str
    presets: dict[str, dict]

    def config_class(self) -> type:
        return _resolve(self.config)

    def describes(self, cfg) -> bool:
        """Whether `cfg` is this architecture's config (without importing the architecture)."""
        return f"{type(cfg).__module__}:{type(cfg).__qualname__}" == self.config


ARCHITECTURES: dict[str, Architecture] = {
    "unet": Architecture("scm.nets.unet:UNetConfig", "scm.nets.unet:UNet", UNET_PRESETS),
    "dit": Architecture("scm.nets.dit:DiTConfig", "scm.nets.dit:DiT", DIT_PRESETS),
    "video": Architecture("scm.nets.video:VideoConfig", "scm.nets.video:VideoTransformer", VIDEO_PRESETS),
    "audio": Architecture("scm.nets.audio:AudioConfig", "scm.nets.audio:AudioTransformer", AUDIO_PRESETS),
    # a diffusers teacher's network as its student: made from the teacher (scm.diffusers.net.student_config)
    "diffusers": Architecture("scm.diffusers.net_config:DiffusersNetConfig", "scm.diffusers.net:DiffusersNet",
                              {"diffusers": {}}),
}

# preset name → architecture name
NET_PRESETS: dict[str, str] = {name: arch for arch, a in ARCHITECTURES.items() for name in a.presets}


def _arch(preset: str) -> Architecture:
    if preset not in NET_PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; known: {', '.join(NET_PRESETS)}")
    return ARCHITECTURES[NET_PRESETS[preset]]


def config_class(preset: str) -> type:
    """The config class (UNetConfig, DiTConfig, VideoConfig, AudioConfig or DiffusersNetConfig) of a preset."""
    return _arch(preset).config_class()


def net_config(preset: str, **fields) -> NetConfig:
    """A network preset's config with `fields` (img_resolution, img_channels, frames, length, …) set over it."""
    arch = _arch(preset)
    return arch.config_class()(**{**arch.presets[preset], **fields})


def build_net(cfg: NetConfig, sigma_d: float) -> nn.Module:
    """The network a config describes (a fresh initialization), for data of std σ_d (the run's `loss.sigma_d`)."""
    for arch in ARCHITECTURES.values():
        if arch.describes(cfg):
            return _resolve(arch.network)(cfg, sigma_d)
    raise TypeError(f"not a network config: {type(cfg).__name__}")
