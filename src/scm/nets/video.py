"""A video diffusion transformer for sCM: `net(x_t/σ_d, t, labels, guidance=None, text=None, text_mask=None,
text_pooled=None, return_weight=False)` -> F (or (F, w)) on clips x [B, C, T, H, W], the call of `scm.nets.dit.DiT`.

It is the DiT (`scm.nets.dit`) with a 3-D token geometry, not a copy of it: the same time, class, guidance and
prompt conditioning, the same modulated blocks with their stabilisers (c_noise(t) = t, adaptive double layer norm,
QK normalization), the same adaptive-weight head and initialization (a fresh network gives F = 0), the same
exact-JVP attention. What differs:

- Patches are pt×p×p (`temporal_patch`, `patch_size`): the clip becomes (T/pt)·(H/p)·(W/p) tokens, ordered frame
  by frame (time outermost, then rows, then columns), each a linear map of its C·pt·p·p values.
- The position embedding is the fixed separable sin-cos one of `dit.sincos_position_embedding` along (t, h, w):
  a third of the channels each (time takes the remainder), half sin and half cos.
- Attention (`attention`): "full" attends over all tokens of the clip in every block (DiT's block unchanged);
  "factorised" attends within each frame (space: the block's own attention, over (H/p)(W/p) tokens, frames folded
  into the batch), then, in a second gated branch of the same block with its own modulation, along time at each
  position (T/pt tokens, positions folded into the batch), then the MLP; as TimeSformer's divided space-time
  attention [Bertasius et al. 2021] and Latte's variant 1 [Ma et al. 2024], but space first. The temporal branch
  is modulated and gated like the spatial one (its gate starts at zero, so a fresh block is still the identity).

Default: factorised. Measured on two (shared, busy) CPU threads (benchmarks/video_attention.py →
benchmarks/results/video_attention.md; class labels and guidance input). `video-tiny`, batch 8 of 1×8×32×32 clips
(512 tokens): factorised 1.74M parameters against full 1.28M (+36%: the temporal branch); the forward alone is
cheaper with full attention (666 against 1182 ms: at 512 tokens the CPU's attention is cheap and the temporal
branch adds linear layers), but the tangent pass (forward + JVP, 1726 against 1508 ms) and the backward dominate an
sCM step, and an estimated step (tangent pass + forward + backward) costs 4.1 s factorised against 6.2 s full.
`video-S` on 1×20×64×64 (2560 tokens, batch 1): 74.7 s against 175 s a step (full attention's logits grow with the
square of the clip's tokens: 2560² a head against 10·256² + 256·10²), with 45.0M against 32.6M parameters. So the
factorised layout is the better trade-off at every size measured; full attention remains a setting
(`attention="full"`).

Presets (parameter counts for 1×T×H×W clips, unconditional, factorised; `frames`/`img_resolution` come from the
run): `video-tiny` 1.72M (1×8×32×32, 1-digit Moving MNIST; 1×4×4 patches: 512 tokens; depth 4, width 128; trainable
on 2 CPU cores in minutes), `video-S` 44.9M and `video-B` 179M (DiT-S/B widths and depths, 2×4×4 patches: 2560
tokens at 20×64×64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scm.nets.dit import Block, DiT, DiTConfig, modulate
from scm.nets.functional import gated_residual, modulated_layer_norm
from scm.nets.layers import Linear
from scm.precision import to_compute

__all__ = ["ATTENTION_LAYOUTS", "VIDEO_PRESETS", "VideoConfig", "VideoTransformer", "count_parameters"]

ATTENTION_LAYOUTS = ("factorised", "full")


@dataclass
class VideoConfig(DiTConfig):
    """The DiT's configuration (`DiTConfig`: widths, conditioning, stabilisers) plus the clip's time axis."""

    frames: int = 8                     # T: frames per clip (the item is [C, T, H, W]; H, W from img_resolution)
    temporal_patch: int = 1             # pt: frames per patch (patches are pt×p×p)
    attention: str = "factorised"       # "factorised" (space, then time, in every block) | "full" (module docstring)

    def __post_init__(self):
        for name in ("frames", "temporal_patch"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"VideoConfig.{name} must be a positive int, got {v!r}")
        if self.frames % self.temporal_patch:
            raise ValueError(f"VideoConfig.frames={self.frames} is not divisible by "
                             f"temporal_patch={self.temporal_patch}")
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"VideoConfig.attention must be one of {ATTENTION_LAYOUTS}, got {self.attention!r}")
        super().__post_init__()

    @property
    def img_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the network's input and output."""
        return (self.img_channels, self.frames, *super().img_shape[1:])

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return (self.temporal_patch, self.patch_size, self.patch_size)


# One line a preset; frames and img_resolution are the run's. DiT-S/B widths for 20×64×64 clips.
VIDEO_PRESETS: dict[str, dict] = {
    "video-tiny": dict(frames=8, patch_size=4, hidden_size=128, depth=4, num_heads=2, embed_channels=128),
    "video-S": dict(frames=20, temporal_patch=2, patch_size=4, hidden_size=384, depth=12, num_heads=6),
    "video-B": dict(frames=20, temporal_patch=2, patch_size=4, hidden_size=768, depth=12, num_heads=12),
}


class VideoBlock(Block):
    """The DiT block over a clip's tokens [N, T'·S, C] (T' token frames of S tokens each): full attention over all
    of them, or attention within each frame then, in its own modulated and gated branch, along time."""

    def __init__(self, cfg: VideoConfig):
        super().__init__(cfg)
        self.frames = cfg.frames // cfg.temporal_patch
        if cfg.attention == "factorised":
            c = cfg.hidden_size
            self.time_modulation = Linear(c, 3 * c)  # shift, scale, gate of the temporal branch
            self.time_qkv = Linear(c, 3 * c)
            self.time_proj = Linear(c, c)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, prompt: tuple | None = None) -> torch.Tensor:
        if self.cfg.attention == "full":
            return super().forward(x, cond, prompt)
        kind = self.cfg.modulation
        with torch.autocast(x.device.type, enabled=False):
            mod = self.modulation(to_compute(cond))[:, None, :]
            time_mod = self.time_modulation(to_compute(cond))[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        shift_t, scale_t, gate_t = time_mod.chunk(3, dim=-1)
        x = gated_residual(x, gate1, self.spatial_attention(modulate(x, scale1, shift1, kind)))
        x = gated_residual(x, gate_t, self.temporal_attention(modulate(x, scale_t, shift_t, kind)))
        if prompt is not None:
            x = x + self.cross_attention(modulated_layer_norm(x), *prompt)
        return gated_residual(x, gate2, self.mlp(modulate(x, scale2, shift2, kind)))

    def spatial_attention(self, h: torch.Tensor) -> torch.Tensor:
        """Attention among the tokens of each frame: [N, T'·S, C] -> [N·T', S, C] (a view), and back."""
        n, length, c = h.shape
        out = self.self_attention(h.reshape(n * self.frames, length // self.frames, c), self.qkv, self.proj)
        return out.reshape(n, length, c)

    def temporal_attention(self, h: torch.Tensor) -> torch.Tensor:
        """Attention along time at each spatial position: [N, T'·S, C] -> [N·S, T', C], and back."""
        n, length, c = h.shape
        t, s = self.frames, length // self.frames
        seq = h.reshape(n, t, s, c).transpose(1, 2).reshape(n * s, t, c)
        out = self.self_attention(seq, self.time_qkv, self.time_proj)
        return out.reshape(n, s, t, c).transpose(1, 2).reshape(n, length, c)


class VideoTransformer(DiT):
    """The DiT on clips [B, C, T, H, W] (module docstring): 3-D patches and positions, full or factorised
    attention; its conditioning, adaptive-weight head and call are the DiT's."""

    block_class = VideoBlock

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The DiT's initialization; the temporal branch's gate starts at zero like the others (every row of its
        modulation with adaLN-Zero), so a fresh block is the identity."""
        super()._init_weights()
        c = self.cfg.hidden_size
        for block in self.blocks:
            if hasattr(block, "time_modulation"):
                rows = slice(0, 3 * c) if self.cfg.modulation == "adaln_zero" else slice(2 * c, 3 * c)
                block.time_modulation.weight[rows].zero_()


def count_parameters(preset: str, frames: int, resolution: int, channels: int = 1) -> int:
    """The parameter count of a video preset for C×T×R×R clips (built on the meta device: no memory)."""
    with torch.device("meta"):
        cfg = VideoConfig(**{**VIDEO_PRESETS[preset], "frames": frames, "img_resolution": resolution,
                             "img_channels": channels})
        return sum(p.numel() for p in VideoTransformer(cfg, 0.5).parameters())

