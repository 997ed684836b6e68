"""An EDM2 (config G) U-Net with sCM's changes (Lu & Song §4.1, App. G): c_noise(t) = t with a positional
embedding, adaptive double normalization, an optional guidance-scale input, and the adaptive-weight head
w_φ(t). Called as `net(x_t/σ_d, t, labels, guidance=None, return_weight=False)` -> F (or (F, w)). Images need not
be square: `img_resolution` is R (R×R) or (H, W), both divisible by 2 per down-sampling level.

Text (`text_dim` > 0; presets `tiny-text`, `S-text` … `XXL-text`): Stable Diffusion's U-Net design [Rombach et al.
2022, §3.3] in EDM2's magnitude-preserving form. Every block with self-attention follows it with cross-attention
from its pixels to the prompt's tokens: cosine attention as the self-attention's (q, k and v normalized per head),
the padding masked (an all-padding prompt contributes exactly 0), the output projected and mixed in by mp_sum at
`attn_balance`. The prompt's tokens are normalized to unit RMS and pass once through a magnitude-preserving caption
MLP into the embedding width (each block projects them to its keys and values); a pooled embedding, where the
encoder has one, is normalized and mixed into the conditioning vector as the class label is. The prompt does not
depend on t, so the cross-attention's tangent flows only through its queries. The network then also takes
text=[B, T, text_dim] (float), text_mask=[B, T] (bool, True on real tokens) and text_pooled=[B, P].

The network does not know what trains it: the same forward serves diffusion, sCT and sCD, their JVP
passes, and sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scm._checks import sizes
from scm.nets.attention import attention
from scm.nets.functional import clip, silu, upsample2x
from scm.nets.layers import (
    SILU_GAIN,
    FourierEmbedding,
    MPConv,
    Network,
    PositionalEmbedding,
    adaptive_double_norm,
    check_input,
    check_prompt,
    check_text_widths,
    class_labels,
    guidance_scales,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
)
from scm.precision import to_compute

__all__ = ["UNET_PRESETS", "UNet", "UNetConfig"]


@dataclass
class UNetConfig:
    """Network configuration (one line a field; presets set a few of them, see UNET_PRESETS)."""

    img_resolution: int | tuple[int, int] = 32    # R (R×R images) or (H, W)
    img_channels: int = 3
    label_dim: int = 0                  # number of classes; 0 = unconditional
    model_channels: int = 192           # base channel count C
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3                 # residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (16, 8)
    channel_mult_emb: int = 2           # embedding width = C·this (EDM2: 4; see README "Networks")
    channels_per_head: int = 64
    dropout: float = 0.0
    dropout_max_res: int | None = None  # dropout only in blocks at resolution <= this (sCT: 16); None = all
    label_dropout: float = 0.0          # drop labels with this probability in training (classifier-free guidance)
    guidance_embed: bool = False        # take a guidance-scale input (sCD students with CFG, §5.2)
    checkpointing: bool = False         # recompute each block's activations in the backward pass (saves memory)
    text_dim: int = 0                   # width of the prompt's token embeddings (0: no text; set from the data)
    text_pooled_dim: int = 0            # width of its pooled embedding (0: none)
    time_embed: str = "positional"      # "positional" (§4.1) | "fourier" (ablation)
    c_noise: str = "t"                  # "t" (§4.1) | "log_sigma": EDM2's log(σ)/4 (ablation)
    fourier_scale: float = 16.0         # scale of the "fourier" embedding
    weight_channels: int = 128          # embedding width of the adaptive-weight head w_φ(t)
    res_balance: float = 0.3
    attn_balance: float = 0.3
    label_balance: float = 0.5
    concat_balance: float = 0.5
    clip_act: float | None = 256.0

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if not isinstance(self.img_resolution, int):
            self.img_resolution = tuple(self.img_resolution)
        sizes(self.img_resolution, "img_resolution")
        for name in ("img_channels", "model_channels", "num_blocks", "channel_mult_emb"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {v!r}")
        if any(n % (1 << (len(self.channel_mult) - 1)) for n in self.img_shape[1:]):
            raise ValueError(
                f"UNetConfig.img_resolution={self.img_resolution} is not divisible by 2^{len(self.channel_mult) - 1} "
                f"(channel_mult has {len(self.channel_mult)} levels)"
            )
        if not 0 <= self.dropout < 1 or not 0 <= self.label_dropout < 1:
            raise ValueError(f"dropout and label_dropout must lie in [0, 1), got {self.dropout}, {self.label_dropout}")
        if self.time_embed not in ("positional", "fourier"):
            raise ValueError(f"UNetConfig.time_embed must be 'positional' or 'fourier', got {self.time_embed!r}")
        if self.c_noise not in ("t", "log_sigma"):
            raise ValueError(f"UNetConfig.c_noise must be 't' or 'log_sigma', got {self.c_noise!r}")
        if self.label_dim < 0:
            raise ValueError(f"UNetConfig.label_dim must be >= 0, got {self.label_dim}")
        check_text_widths(self)

    @property
    def img_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the network's input and output."""
        return (self.img_channels, *sizes(self.img_resolution, "img_resolution"))


# One line a preset. EDM2 config G (S…XXL, channels 192…448) as in sCM's ImageNet 64×64 pixel and 512×512
# latent (64×64×4) models; tiny for CPU tests and the demo (28×28 or 32×32); cifar at DDPM++ size.
UNET_PRESETS: dict[str, dict] = {
    "tiny":  dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(7, 8), channel_mult_emb=4),
    "cifar": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), channel_mult_emb=4),
    "S":     dict(model_channels=192),
    "M":     dict(model_channels=256),
    "L":     dict(model_channels=320),
    "XL":    dict(model_channels=384),
    "XXL":   dict(model_channels=448),
}
# Text variants: the same U-Nets with cross-attention to the prompt (module docstring, "Text"). The prompt's width is
# the data's encoder's (set when a run resolves its data): 64 for the built-in toy encoder, 768 for CLIP-L (SD 1.x),
# 4096 for T5-XXL; the large presets name CLIP-L's, for their parameter counts.
UNET_PRESETS |= {f"{name}-text": {**cfg, "text_dim": 768} for name, cfg in list(UNET_PRESETS.items()) if name != "tiny"}
UNET_PRESETS["tiny-text"] = {**UNET_PRESETS["tiny"], "text_dim": 64, "text_pooled_dim": 64}


class Block(nn.Module):
    """EDM2 encoder/decoder block (Fig. 21) with adaptive double normalization of the residual branch."""

    def __init__(self, cin, cout, cemb, res, flavor, resample, attn, cfg: UNetConfig):
        super().__init__()
        self.flavor, self.resample, self.cfg = flavor, resample, cfg
        self.dropout = cfg.dropout if cfg.dropout_max_res is None or res <= cfg.dropout_max_res else 0.0
        self.num_heads = cout // cfg.channels_per_head if attn else 0
        if attn and self.num_heads == 0:
            self.num_heads = 1
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, (3, 3))
        self.emb_linear = MPConv(cemb, 2 * cout)  # scale and shift of the adaptive double norm
        self.conv_res1 = MPConv(cout, cout, (3, 3))
        self.conv_skip = MPConv(cin, cout, (1, 1)) if cin != cout else None
        self.attn_qkv = MPConv(cout, 3 * cout, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(cout, cout, (1, 1)) if self.num_heads else None
        cross = bool(self.num_heads and cfg.text_dim)  # cross-attention to the prompt (module docstring, "Text")
        self.cross_q = MPConv(cout, cout, (1, 1)) if cross else None
        self.cross_kv = MPConv(cemb, 2 * cout) if cross else None  # from the caption MLP's tokens (width cemb)
        self.cross_proj = MPConv(cout, cout, (1, 1)) if cross else None

    def forward(self, x, emb, prompt: tuple | None = None):
        """`prompt`: (tokens [B, T, cemb] from the caption MLP, key mask [B, T]) of a text network."""
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)  # EDM2's [1, 1] box filter, stride 2
        elif self.resample == "up":
            x = upsample2x(x)  # its transpose (nearest neighbour)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # mp_silu = silu·SILU_GAIN; the gain is folded into the next convolution's (tiny) weight.
        y = self.conv_res0(silu(x), gain=SILU_GAIN)
        with torch.autocast(x.device.type, enabled=False):  # embedding maths in fp32 (see layers.PositionalEmbedding)
            scale, shift = self.emb_linear(to_compute(emb)).chunk(2, dim=1)
        y = silu(adaptive_double_norm(y, scale, shift))
        if self.dropout:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y, gain=SILU_GAIN)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.cfg.res_balance)

        if self.num_heads:
            n, c, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # pixel norm per head (cosine attention)
            fold = lambda a: a.reshape(n * self.num_heads, -1, h * w).transpose(1, 2)  # noqa: E731
            y = attention(fold(q), fold(k), fold(v))  # exact JVP, bounded memory
            y = y.transpose(1, 2).reshape(n, c, h, w)
            x = mp_sum(x, self.attn_proj(y), t=self.cfg.attn_balance)
            if self.cross_q is not None:
                x = mp_sum(x, self.cross_attention(x, *prompt), t=self.cfg.attn_balance)

        if self.cfg.clip_act is not None:
            x = clip(x, self.cfg.clip_act)
        return x


    def cross_attention(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cosine attention from the pixels of x [N, C, H, W] to the prompt's tokens [N, T, cemb] (padding masked;
        an all-padding prompt gives 0), projected back to C channels."""
        n, c, h, w = x.shape
        heads, d, length = self.num_heads, c // self.num_heads, tokens.shape[1]
        q = normalize(self.cross_q(x).reshape(n, heads, d, h * w), dim=2)  # per head, as the self-attention's
        q = q.reshape(n * heads, d, h * w).transpose(1, 2)
        kv = normalize(self.cross_kv(tokens).reshape(n, length, 2, heads, d), dim=4)
        k, v = kv.permute(2, 0, 3, 1, 4).reshape(2, n * heads, length, d).unbind(0)
        y = attention(q, k, v, key_mask=mask.repeat_interleave(heads, dim=0))  # exact JVP (through q only)
        return self.cross_proj(y.transpose(1, 2).reshape(n, c, h, w))


class UNet(Network):
    """EDM2 U-Net (config G) mapping (x_t/σ_d, t, labels, guidance) to F, plus w_φ(t) on request. Its blocks are
    named by their feature map's size, "HxW_…"; a level's resolution, which `attn_resolutions` and `dropout_max_res`
    refer to, is the longer side of its feature map (H = W for square images)."""

    def __init__(self, cfg: UNetConfig, sigma_d: float):
        super().__init__(cfg, sigma_d)
        cnoise = cfg.model_channels
        cemb = cfg.model_channels * cfg.channel_mult_emb
        self.out_gain = nn.Parameter(torch.zeros([1]))  # 1-D: FSDP2 cannot shard scalars

        # Embeddings (time, class, guidance) and the adaptive-weight head.
        self.time_embed = self._time_embedding(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(cfg.label_dim, cemb) if cfg.label_dim else None
        self.guidance_embed = PositionalEmbedding(cnoise) if cfg.guidance_embed else None
        self.emb_guidance = MPConv(cnoise, cemb) if cfg.guidance_embed else None
        self.weight_embed = self._time_embedding(cfg.weight_channels)
        self.weight_linear = MPConv(cfg.weight_channels, 1)
        if cfg.text_dim:  # the prompt's tokens through a caption MLP; its pooled vector into the embedding
            self.text_mlp1, self.text_mlp2 = MPConv(cfg.text_dim, cemb), MPConv(cemb, cemb)
        self.emb_pooled = MPConv(cfg.text_pooled_dim, cemb) if cfg.text_pooled_dim else None
        cout = self._encoder(cemb)
        cout = self._decoder(cemb, cout)
        self.out_conv = MPConv(cout, cfg.img_channels, (3, 3))

    def _levels(self):
        """(level, block channels, "HxW", resolution) of each level, the input's first."""
        cfg, (h, w) = self.cfg, self.cfg.img_shape[1:]
        for level, mult in enumerate(cfg.channel_mult):
            size = (h >> level, w >> level)
            yield level, cfg.model_channels * mult, f"{size[0]}x{size[1]}", max(size)

    def _encoder(self, cemb: int) -> int:
        cfg, cout = self.cfg, self.cfg.img_channels + 1
        self.enc = nn.ModuleDict()
        for level, channels, name, res in self._levels():
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{name}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{name}_down"] = Block(cout, cout, cemb, res, "enc", "down", False, cfg)
            for i in range(cfg.num_blocks):
                cin, cout = cout, channels
                self.enc[f"{name}_block{i}"] = Block(cin, cout, cemb, res, "enc", "keep", res in cfg.attn_resolutions,
                                                     cfg)
        return cout

    def _decoder(self, cemb: int, cout: int) -> int:
        cfg = self.cfg
        self.dec = nn.ModuleDict()
        skips = [m.out_channels if isinstance(m, MPConv) else m.conv_res1.out_channels for m in self.enc.values()]
        for level, channels, name, res in reversed(list(self._levels())):
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{name}_in0"] = Block(cout, cout, cemb, res, "dec", "keep", True, cfg)
                self.dec[f"{name}_in1"] = Block(cout, cout, cemb, res, "dec", "keep", False, cfg)
            else:
                self.dec[f"{name}_up"] = Block(cout, cout, cemb, res, "dec", "up", False, cfg)
            for i in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{name}_block{i}"] = Block(cin, cout, cemb, res, "dec", "keep", res in cfg.attn_resolutions,
                                                     cfg)
        return cout

    def _time_embedding(self, channels: int) -> nn.Module:
        if self.cfg.time_embed == "fourier":
            return FourierEmbedding(channels, scale=self.cfg.fourier_scale)
        return PositionalEmbedding(channels)

    # -- conditioning ---------------------------------------------------------------------------------------

    def _labels(self, labels, batch: int, device) -> torch.Tensor:
        """One-hot (or given soft) labels [B, label_dim], zeros = unconditional; label dropout in training
        (layers.class_labels)."""
        dropout = self.cfg.label_dropout if self.training else 0.0
        return class_labels(labels, batch, self.cfg.label_dim, device, dropout)

    def embedding(self, t, labels=None, guidance=None, pooled=None) -> torch.Tensor:
        """The conditioning vector fed to every block, computed in float32."""
        batch, device = t.shape[0], t.device
        with torch.autocast(device.type, enabled=False):
            emb = self.emb_noise(self.time_embed(self.c_noise(t)))
            if self.emb_label is not None:
                onehot = self._labels(labels, batch, device).to(emb.dtype)
                emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.cfg.label_dim)), t=self.cfg.label_balance)
            elif labels is not None:
                raise ValueError("this network is unconditional (label_dim=0) but labels were given")
            if self.emb_pooled is not None:  # unit RMS in, as the labels' scaled one-hots
                pooled = normalize(to_compute(pooled), dim=1).to(emb.dtype)
                emb = mp_sum(emb, self.emb_pooled(pooled), t=self.cfg.label_balance)
            if self.emb_guidance is not None:
                g = guidance_scales(guidance, batch, device, emb.dtype)
                emb = mp_sum(emb, self.emb_guidance(self.guidance_embed(g)), t=0.5)  # added to the time embedding
            return mp_silu(emb)

    def prompt(self, batch: int, text=None, text_mask=None, text_pooled=None) -> tuple | None:
        """(tokens from the caption MLP, key mask) of a text network's prompt, None for others
        (layers.check_prompt)."""
        if not check_prompt(self.cfg, batch, text, text_mask, text_pooled):
            return None
        tokens = normalize(to_compute(text), dim=-1)  # unit RMS per token: the encoder's scale does not matter
        return self.text_mlp2(mp_silu(self.text_mlp1(tokens))), text_mask

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x, t, labels=None, guidance=None, text=None, text_mask=None, text_pooled=None,
                return_weight: bool = False):
        check_input("UNet", x, t, self.shape)
        prompt = self.prompt(x.shape[0], text, text_mask, text_pooled)
        emb = self.embedding(t, labels, guidance, text_pooled)
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            h = block(h) if name.endswith("_conv") else self.block(block, h, emb, prompt)
            skips.append(h)
        for name, block in self.dec.items():
            if "block" in name:
                h = mp_cat(h, skips.pop(), t=self.cfg.concat_balance)
            h = self.block(block, h, emb, prompt)
        out = self.out_conv(h, gain=self.out_gain).to(x.dtype)
        return (out, self.weight(t)) if return_weight else out
