"""JVP-ready networks: a net maps (x_t/σ_d, t, labels) to F and, on request, the adaptive weight w_φ(t).

Submodules: `functional` (ops with hand-written JVP rules), `attention` (exact-JVP attention),
`layers` (magnitude-preserving layers, time embeddings), `unet` (the U-Net and its presets).
"""

from scm.nets.unet import NET_PRESETS, UNet, UNetConfig, build_unet

__all__ = ["NET_PRESETS", "UNet", "UNetConfig", "build_unet"]
