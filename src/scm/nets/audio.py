"""An audio diffusion transformer for sCM: `net(x_t/σ_d, t, labels, guidance=None, text=None, text_mask=None,
text_pooled=None, return_weight=False)` -> F (or (F, w)) on waveforms x [B, C, L] (16 kHz, 1 s: L = 16000), the
call of `scm.nets.dit.DiT`.

It is the DiT (`scm.nets.dit`) with a 1-D token geometry: the waveform is cut into L/p non-overlapping patches of
p samples (`patch_size`; 64 samples = 4 ms at 16 kHz: 250 tokens a second), each a linear map of its C·p values,
with a fixed 1-D sin-cos position embedding (`dit.sincos_position_embedding` along one axis); everything else is
the DiT's: the time, class, guidance and prompt conditioning, the modulated blocks and their stabilisers, the exact
JVP, the adaptive-weight head, F = 0 at initialization.

Why a patch transformer on the waveform rather than the alternatives (measured on two CPU threads,
benchmarks/audio_network.py → benchmarks/results/audio_network.md):
- against a 1-D convolutional U-Net on the waveform (residual conv blocks with time modulation, 4× strided down-
  and upsampling per level, skip connections; 1.24M parameters against 1.27M), 100 Adam steps at batch 8 on
  synthetic tones (random pitch, phase, envelope): the U-Net learns more per step (held-out diffusion loss 0.50 →
  0.11, the transformer's 0.50 → 0.24; 0.16 after 200 steps) but a step costs 12× as much (1362 against 117 ms) and
  its tangent pass 15× (1762 against 117 ms): convolutions over 16000 samples at the top level against 250 tokens.
  In equal CPU time the transformer takes ~12 steps to the U-Net's one, and its JVP is the DiT's (tested, with the
  Triton attention kernels on GPUs) where the conv net's would rest on PyTorch's generic rules. Whether the
  transformer also wins at equal wall time to convergence was not measured (the runs were kept short);
- against a 2-D model on a spectrogram: an STFT is exactly invertible only with its phase (a complex or
  real/imaginary pair of channels whose values are not in [-1, 1] and whose statistics differ from the data's σ_d),
  and magnitude spectrograms need a vocoder; patches of the waveform are a lossless reshape, so the noise process
  and σ_d stay those of the data.

Presets (parameter counts for 1×16000 waveforms, unconditional; `length` comes from the run): `audio-tiny` 1.27M
(64-sample patches, width 128, depth 4: trainable on 2 CPU cores) and `audio-B` 32.5M (32-sample patches:
500 tokens, DiT-S's width 384 and depth 12).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scm.nets.dit import DiT, DiTConfig

__all__ = ["AUDIO_PRESETS", "AudioConfig", "AudioTransformer", "count_parameters"]


@dataclass
class AudioConfig(DiTConfig):
    """The DiT's configuration (`DiTConfig`: widths, conditioning, stabilisers) for waveforms [C, length];
    `patch_size` is the samples per token. The images' `img_resolution` is not used."""

    length: int = 16_000                # L: samples per clip (the item is [C, L])

    def __post_init__(self):
        if not (isinstance(self.length, int) and not isinstance(self.length, bool) and self.length > 0):
            raise ValueError(f"AudioConfig.length must be a positive int, got {self.length!r}")
        if isinstance(self.patch_size, int) and self.patch_size > 0 and self.length % self.patch_size:
            raise ValueError(f"AudioConfig.length={self.length} is not divisible by patch_size={self.patch_size}")
        super().__post_init__()

    @property
    def img_shape(self) -> tuple[int, int]:
        """(C, L) of the network's input and output."""
        return (self.img_channels, self.length)

    @property
    def patch_shape(self) -> tuple[int]:
        return (self.patch_size,)


# One line a preset; length is the run's.
AUDIO_PRESETS: dict[str, dict] = {
    "audio-tiny": dict(patch_size=64, hidden_size=128, depth=4, num_heads=2, embed_channels=128),
    "audio-B": dict(patch_size=32, hidden_size=384, depth=12, num_heads=6),
}


class AudioTransformer(DiT):
    """The DiT on waveforms [B, C, L] (module docstring): 1-D patches and positions; its conditioning,
    adaptive-weight head and call are the DiT's."""


def count_parameters(preset: str, length: int = 16_000, channels: int = 1) -> int:
    """The parameter count of an audio preset for C×L waveforms (built on the meta device: no memory)."""
    with torch.device("meta"):
        cfg = AudioConfig(**{**AUDIO_PRESETS[preset], "length": length, "img_channels": channels})
        return sum(p.numel() for p in AudioTransformer(cfg, 0.5).parameters())
