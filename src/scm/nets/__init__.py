"""JVP-ready networks: a net maps (x_t/σ_d, t, labels) to F and, on request, the adaptive weight w_φ(t).

Submodules: `functional` (ops with hand-written JVP rules), `attention` (exact-JVP attention, with a Triton
kernel on GPUs), `layers` (magnitude-preserving layers, time embeddings, what every network shares), `unet` (the
U-Net and its presets), `dit` (the diffusion transformer and its presets), `video` and `audio` (the transformer
on clips [B, C, T, H, W] and on waveforms [B, C, L], and their presets), `registry` (every network preset by
name). This package's public API is re-exported here.
"""

from scm.nets.audio import AUDIO_PRESETS, AudioConfig, AudioTransformer
from scm.nets.dit import DIT_PRESETS, DiT, DiTConfig
from scm.nets.registry import ARCHITECTURES, NET_PRESETS, NetConfig, build_net, config_class, net_config
from scm.nets.unet import UNET_PRESETS, UNet, UNetConfig
from scm.nets.video import VIDEO_PRESETS, VideoConfig, VideoTransformer

__all__ = [
    "ARCHITECTURES",
    "AUDIO_PRESETS",
    "DIT_PRESETS",
    "NET_PRESETS",
    "UNET_PRESETS",
    "VIDEO_PRESETS",
    "AudioConfig",
    "AudioTransformer",
    "DiT",
    "DiTConfig",
    "NetConfig",
    "UNet",
    "UNetConfig",
    "VideoConfig",
    "VideoTransformer",
    "build_net",
    "config_class",
    "net_config",
]
