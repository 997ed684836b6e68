"""A diffusion transformer (DiT, Peebles & Xie 2023) made ready for sCM's JVP: `net(x_t/σ_d, t, labels,
guidance=None, text=None, text_mask=None, text_pooled=None, return_weight=False)` -> F (or (F, w)), the call of
`scm.nets.unet.UNet` plus a prompt for a text network (see "Text" below).

Structure (DiT): p×p patches -> a linear embedding + a fixed 2-D sin-cos position embedding -> `depth`
pre-norm transformer blocks (attention, then a GELU MLP, each a residual branch modulated and gated by the
conditioning vector) -> a modulated final norm and linear layer -> unpatchify. The conditioning vector sums
the time embedding (positional embedding of c_noise(t) -> MLP), the class embedding and, optionally, the
guidance scale's embedding. Attention runs through `scm.nets.attention.attention` (exact JVP, bounded
memory) with the heads folded into the batch; every op with a costly or graph-recording forward-AD formula
is an op of `scm.nets.functional` with a hand-written JVP, so one code path serves the forward, the tangent
pass (`torch.autograd.forward_ad`, `torch.func.jvp`), the fused pass and sampling.

sCM's stabilisers, carried over from the U-Net to the transformer (each a decision; sources in brackets):

(a) Time conditioning: c_noise(t) = t (radians, no ×1000) through a positional embedding whose largest
    frequency is 1, computed in float32 whatever the autocast state, then an MLP also in float32 [sCM §4.1,
    eq. 7]. DiT embeds integer timesteps 0…999; a time scaled like that multiplies sin t·∂F/∂t by ~1000
    (Sana-Sprint's "dense time embedding" removes the same factor [Sana-Sprint, Chen et al. 2025, §3.2]).
    `c_noise="log_sigma"` (EDM's log(σ_d tan t)/4) is kept as an ablation: there sin t·∂F/∂t grows like
    1/cos t as t -> π/2.

(b) Well-conditioned modulation. sCM replaces the U-Net's AdaGN norm(x)·s(t) + b(t) by adaptive double
    normalization norm(x)·pnorm(s(t)) + pnorm(b(t)) [sCM §4.1]. Its transformer counterpart here
    (`modulation="double_norm"`, the default) replaces DiT's adaLN-Zero LN(x)·(1 + s) + b by
        LN(x)·pnorm(s)/√2 + pnorm(b)/√2            (layers.adaptive_double_layer_norm)
    with pnorm the pixel norm of the per-example vectors s, b over channels; and the conditioning vector
    itself is pixel-normalized before the SiLU and the modulation layers (the counterpart of EDM2's
    magnitude-preserving embedding that the U-Net has by construction). Why: the modulation's scale and
    shift, and hence ∂F/∂t through them, then no longer grow with the norms of the embedding MLP or of the
    modulation weights — they are invariant to both scales, as in the U-Net — which is what the double
    normalization is for. The gates of the residual branches are kept as in adaLN-Zero, linear in the
    (normalized) conditioning and zero-initialized, so every block starts as the identity [DiT §3.2]; only
    their rows of the modulation weights start at zero (pnorm of an all-zero vector would have an unbounded
    derivative, so the scale/shift rows start random). The whole modulation is computed in float32 under
    autocast, like the U-Net's embedding [sCM §4.1]. `modulation="adaln_zero"` is DiT's original scheme,
    an ablation.

(c) QK normalization: q and k are RMS-normalized per head (`qk_norm=True`, the default), so the logits
    lie in [−sqrt(d_head), sqrt(d_head)] and the softmax's Jacobian, which the JVP multiplies through, stays
    bounded whatever the weights do. Sana-Sprint found QK normalization necessary for a stable sCM JVP in
    its transformer [Sana-Sprint, Chen et al. 2025, §3.2]; it is the transformer form of EDM2's cosine
    attention, which the U-Net uses (and, like it, has no learned gain).

Text (`text_dim` > 0; presets `dit-tiny-text`, `DiT-S/2-text` … `DiT-XL/2-text`): the block of PixArt-α [Chen et
al. 2023, §2.3]: self-attention, then cross-attention from the image tokens to the prompt's tokens, then the MLP;
the cross-attention is a plain residual x + CrossAttn(LN(x), prompt) (not modulated by time: the prompt does not
change with t), with q and k RMS-normalized per head as in self-attention and its output projection zero-initialized,
so a fresh network ignores the prompt as a fresh block ignores its branches. The prompt's tokens pass once through
PixArt's caption MLP (linear, GELU, linear) into the transformer's width; padding is masked in the attention (an
empty prompt of an encoder that emits no tokens masks every key and contributes exactly 0); a pooled embedding,
where the encoder has one, goes through an MLP and is added to the time embedding, as SD3's pooled CLIP vector is
[Esser et al. 2024, §3]. Why this design rather than SD3/Flux's joint attention (MM-DiT): self-attention and its
Triton JVP kernels stay as they are, the prompt's tokens carry no tangent (they do not depend on t), so the cross-
attention's JVP runs only through the queries, and the extra cost per block is one attention of L×T logits. The
network takes text=[B, T, text_dim] (float), text_mask=[B, T] (bool, True on real tokens) and text_pooled=[B, P].

Other choices: the adaptive-weight head w_φ(t) is the U-Net's (positional embedding of c_noise(t) -> one
linear layer); class labels enter as the U-Net's one-hot rows through a linear table (a zero row is
"unconditional", where DiT learns a null class), with label dropout drawn by torch.rand so that a replayed
pass drops the same rows; the guidance scale gets a positional embedding and a linear layer, added to the time
embedding [sCM §5.2]; GELU is the exact (erf) one, not DiT's tanh approximation (the same function to 1e-3,
and on CPU a fifth of the cost); dropout acts on the MLP's hidden layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scm._checks import sizes
from scm.nets.attention import attention
from scm.nets.functional import gated_residual, gelu, modulated_layer_norm, silu
from scm.nets.layers import (
    Linear,
    MPConv,
    Network,
    PositionalEmbedding,
    adaptive_double_layer_norm,
    check_input,
    check_prompt,
    check_text_widths,
    class_labels,
    guidance_scales,
    normalize,
)
from scm.precision import to_compute

__all__ = ["DIT_PRESETS", "DiT", "DiTConfig"]

MODULATIONS = ("double_norm", "adaln_zero")


@dataclass
class DiTConfig:
    """Transformer configuration (one line a field; presets set a few of them, see DIT_PRESETS)."""

    img_resolution: int | tuple[int, int] = 32    # R (R×R images) or (H, W)
    img_channels: int = 4
    label_dim: int = 0                  # number of classes; 0 = unconditional
    patch_size: int = 2                 # p: the image is cut into (H/p)·(W/p) patches of p×p pixels
    hidden_size: int = 384              # token width
    depth: int = 12                     # transformer blocks
    num_heads: int = 6                  # attention heads (hidden_size must be a multiple)
    mlp_ratio: float = 4.0              # MLP hidden width = hidden_size·this
    dropout: float = 0.0                # dropout on the MLP's hidden layer (sCT)
    label_dropout: float = 0.0          # drop labels with this probability in training (classifier-free guidance)
    guidance_embed: bool = False        # take a guidance-scale input (sCD students with CFG, §5.2)
    checkpointing: bool = False         # recompute each block's activations in the backward pass (saves memory)
    embed_channels: int = 256           # channels of the positional time (and guidance) embedding (DiT: 256)
    weight_channels: int = 128          # embedding width of the adaptive-weight head w_φ(t)
    qk_norm: bool = True                # RMS-normalize q and k per head (stabiliser (c), module docstring)
    modulation: str = "double_norm"     # "double_norm" (stabiliser (b)) | "adaln_zero" (DiT's; ablation)
    c_noise: str = "t"                  # "t" (§4.1) | "log_sigma": EDM's log(σ_d tan t)/4 (ablation)
    text_dim: int = 0                   # width of the prompt's token embeddings (0: no text; set from the data)
    text_pooled_dim: int = 0            # width of its pooled embedding (0: none)

    def __post_init__(self):
        if not isinstance(self.img_resolution, int):
            self.img_resolution = tuple(self.img_resolution)
        sizes(self.img_resolution, "img_resolution")
        for name in ("img_channels", "patch_size", "hidden_size", "depth", "num_heads",
                     "embed_channels", "weight_channels"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {v!r}")
        if not (isinstance(self.label_dim, int) and self.label_dim >= 0):
            raise ValueError(f"DiTConfig.label_dim must be an int >= 0, got {self.label_dim!r}")
        if any(n % q for n, q in zip(self.img_shape[1:], self.patch_shape, strict=True)):
            raise ValueError(f"{type(self).__name__}.img_resolution={self.img_resolution} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size must be a multiple of 4 (2-D sin-cos position embedding), "
                             f"got {self.hidden_size}")
        check_text_widths(self)
        for name in ("embed_channels", "weight_channels"):
            if getattr(self, name) % 2:
                raise ValueError(f"DiTConfig.{name} must be even, got {getattr(self, name)}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0 and self.mlp_hidden >= 1):
            raise ValueError(f"DiTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        for name in ("dropout", "label_dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"DiTConfig.{name} must lie in [0, 1), got {v!r}")
        if self.modulation not in MODULATIONS:
            raise ValueError(f"DiTConfig.modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.c_noise not in ("t", "log_sigma"):
            raise ValueError(f"DiTConfig.c_noise must be 't' or 'log_sigma', got {self.c_noise!r}")

    @property
    def img_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the network's input and output."""
        return (self.img_channels, *sizes(self.img_resolution, "img_resolution"))

    @property
    def patch_shape(self) -> tuple[int, ...]:
        """The sizes of one patch along the item's axes after its channels: (p, p) for images."""
        return (self.patch_size, self.patch_size)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# One line a preset. DiT-S/B/L/XL with 2×2 patches (Peebles & Xie 2023, Table 1) for 32×32×4 latents.
# dit-tiny for CPU tests and the demo (28×28×1 or 32×32×3): 2.4M parameters, head dim 64 as in DiT, 4×4 patches
# (49 or 64 tokens). Measured at batch 64 on 28×28×1 (two CPU threads): a forward costs ~80 ms, ~0.4× the tiny
# U-Net's, and the tangent pass ~2.25× the forward; with 2×2 patches (196 tokens) the same net's forward costs
# ~390 ms (~2× the U-Net's) and its tangent pass ~2.8× that (attention grows with the square of the tokens).
DIT_PRESETS: dict[str, dict] = {
    "dit-tiny": dict(patch_size=4, hidden_size=128, depth=8, num_heads=2, embed_channels=128),
    "DiT-S/2":  dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "DiT-B/2":  dict(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "DiT-L/2":  dict(patch_size=2, hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL/2": dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}
# Text variants: the same transformers with cross-attention to the prompt (module docstring, "Text"). The prompt's
# width is the data's encoder's (set when a run resolves its data): 64 for the built-in toy encoder, 4096 for T5-XXL
# (PixArt), 2304 for Gemma-2-2B (Sana), 768 for CLIP-L; the large presets name T5-XXL's, for their parameter counts.
DIT_PRESETS |= {f"{name}-text": {**cfg, "text_dim": 4096} for name, cfg in list(DIT_PRESETS.items())
                if name != "dit-tiny"}
DIT_PRESETS["dit-tiny-text"] = {**DIT_PRESETS["dit-tiny"], "text_dim": 64, "text_pooled_dim": 64}


def sincos_position_embedding(grid: tuple[int, ...], channels: int) -> torch.Tensor:
    """Fixed separable sin-cos position embedding [prod(grid), channels] of a token grid (row-major: the last axis
    fastest). Each axis gets an even share of the channels (2·⌊channels/(2·axes)⌋, the first axis the remainder),
    half for sin and half for cos of (position·ω_i), ω_i = 10000^(−i/half). For a 2-D grid and channels divisible
    by 4 this is DiT's: a quarter each for sin and cos of (row·ω_i) and of (column·ω_i), ω_i = 10000^(−i/quarter);
    for video (t, h, w) and audio (position) grids the same construction along 3 or 1 axes."""
    share = 2 * (channels // (2 * len(grid)))
    widths = [channels - share * (len(grid) - 1)] + [share] * (len(grid) - 1)
    if share < 2 or widths[0] % 2:
        raise ValueError(f"a sin-cos position embedding of a {len(grid)}-D grid needs an even number of channels "
                         f">= {2 * len(grid)}, got {channels}")
    positions = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    parts = []
    for pos, width in zip(positions, widths, strict=True):
        half = width // 2
        omega = 10_000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        a = pos.reshape(-1)[:, None] * omega[None]
        parts += [torch.sin(a), torch.cos(a)]
    return torch.cat(parts, dim=1).float()


class Block(nn.Module):
    """Pre-norm transformer block: x + g₁·Attn(mod₁(LN(x))), then x + g₂·MLP(mod₂(LN(x))), with the
    modulations and gates computed from the conditioning vector in float32 (module docstring, (b))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        c = cfg.hidden_size
        self.cfg, self.num_heads = cfg, cfg.num_heads
        self.modulation = Linear(c, 6 * c)  # shift, scale, gate of the attention branch, then of the MLP branch
        self.qkv = Linear(c, 3 * c)
        self.proj = Linear(c, c)
        self.fc1 = Linear(c, cfg.mlp_hidden)
        self.fc2 = Linear(cfg.mlp_hidden, c)
        if cfg.text_dim:  # cross-attention to the prompt's tokens (PixArt-α; module docstring, "Text")
            self.cross_q = Linear(c, c)
            self.cross_kv = Linear(c, 2 * c)
            self.cross_proj = Linear(c, c)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, prompt: tuple | None = None) -> torch.Tensor:
        """`prompt`: (tokens [B, T, C] in the transformer's width, key mask [B, T]) of a text network."""
        with torch.autocast(x.device.type, enabled=False):
            mod = self.modulation(to_compute(cond))[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = gated_residual(x, gate1, self.attention(modulate(x, scale1, shift1, self.cfg.modulation)))
        if prompt is not None:
            x = x + self.cross_attention(modulated_layer_norm(x), *prompt)
        x = gated_residual(x, gate2, self.mlp(modulate(x, scale2, shift2, self.cfg.modulation)))
        return x

    def _heads(self, a: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """[N, L, parts·C] -> `parts` tensors [N·heads, L, C/heads] (heads folded into the batch)."""
        n, length, c = a.shape[0], a.shape[1], self.cfg.hidden_size
        h, d = self.num_heads, c // self.num_heads
        a = a.reshape(n, length, parts, h, d).permute(2, 0, 3, 1, 4).contiguous()  # [parts, N, H, L, D]
        out = list(a.unbind(0))
        if self.cfg.qk_norm and parts > 1:  # q and k RMS-normalized per head (stabiliser (c)); v as it is
            out[: parts - 1] = normalize(a[: parts - 1], dim=-1).unbind(0)
        return [x.reshape(n * h, length, d) for x in out]

    def _merge(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """[N·heads, L, C/heads] -> [N, L, C]."""
        h, c = self.num_heads, self.cfg.hidden_size
        return y.reshape(n, h, y.shape[1], c // h).transpose(1, 2).reshape(n, y.shape[1], c)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        return self.self_attention(h, self.qkv, self.proj)

    def self_attention(self, h: torch.Tensor, qkv: Linear, proj: Linear) -> torch.Tensor:
        """Multi-head self-attention over the tokens of h [N, L, C] with the projections qkv and proj."""
        q, k, v = self._heads(qkv(h), 3)
        return proj(self._merge(attention(q, k, v), h.shape[0]))  # exact JVP, bounded memory

    def cross_attention(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention from the image tokens to the prompt's (padding masked; an all-padding prompt gives 0)."""
        (q,) = self._heads(self.cross_q(h), 1)
        if self.cfg.qk_norm:
            q = normalize(q, dim=-1)
        k, v = self._heads(self.cross_kv(tokens), 2)
        keys = mask.repeat_interleave(self.num_heads, dim=0)  # [N·heads, T]
        return self.cross_proj(self._merge(attention(q, k, v, key_mask=keys), h.shape[0]))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        h = gelu(self.fc1(h))
        if self.cfg.dropout:
            h = F.dropout(h, p=self.cfg.dropout, training=self.training)
        return self.fc2(h)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, kind: str) -> torch.Tensor:
    """The modulated pre-norm of a branch: adaptive double layer norm, or DiT's LN(x)·(1 + s) + b."""
    if kind == "double_norm":
        return adaptive_double_layer_norm(x, scale, shift)
    return modulated_layer_norm(x, 1 + scale, shift)


class DiT(Network):
    """Diffusion transformer mapping (x_t/σ_d, t, labels, guidance) to F, plus w_φ(t) on request.

    The token geometry comes from the config (`img_shape`, `patch_shape`), so the video and audio transformers
    (`scm.nets.video`, `scm.nets.audio`) are this network with other configs (and, for video, `block_class`)."""

    block_class = Block  # the transformer block (the video transformer's adds temporal attention)

    def __init__(self, cfg: DiTConfig, sigma_d: float):
        super().__init__(cfg, sigma_d)
        c = cfg.hidden_size
        self.grid = tuple(n // q for n, q in zip(cfg.img_shape[1:], cfg.patch_shape, strict=True))  # patches/axis
        patch_dim = cfg.img_channels * math.prod(cfg.patch_shape)

        # Tokens: a linear map of p×p patches plus a fixed 2-D sin-cos position embedding.
        self.patch_embed = Linear(patch_dim, c)
        self.register_buffer("pos_embed", sincos_position_embedding(self.grid, c), persistent=False)

        # Conditioning (time, class, guidance), all computed in float32, and the adaptive-weight head.
        self.time_embed = PositionalEmbedding(cfg.embed_channels)
        self.time_mlp1 = Linear(cfg.embed_channels, c)
        self.time_mlp2 = Linear(c, c)
        self.label_embed = Linear(cfg.label_dim, c, bias=False) if cfg.label_dim else None  # a table on one-hots
        self.guidance_embed = PositionalEmbedding(cfg.embed_channels) if cfg.guidance_embed else None
        self.guidance_linear = Linear(cfg.embed_channels, c) if cfg.guidance_embed else None
        self.weight_embed = PositionalEmbedding(cfg.weight_channels)
        self.weight_linear = MPConv(cfg.weight_channels, 1)
        if cfg.text_dim:  # the prompt: tokens through PixArt-α's caption MLP; the pooled vector into cond (SD3)
            self.text_mlp1, self.text_mlp2 = Linear(cfg.text_dim, c), Linear(c, c)
        if cfg.text_pooled_dim:
            self.pooled_mlp1, self.pooled_mlp2 = Linear(cfg.text_pooled_dim, c), Linear(c, c)

        self.blocks = nn.ModuleList(self.block_class(cfg) for _ in range(cfg.depth))
        self.final_modulation = Linear(c, 2 * c)  # shift, scale
        self.final_linear = Linear(c, patch_dim)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """DiT's initialization: Xavier-uniform linear layers with zero biases; N(0, 0.02²) embedding MLP and
        label table; zero gates and output layer (adaLN-Zero: every block starts as the identity, F = 0)."""
        for m in self.modules():
            if isinstance(m, Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in (self.time_mlp1, self.time_mlp2, self.label_embed, self.guidance_linear,
                  getattr(self, "pooled_mlp1", None), getattr(self, "pooled_mlp2", None)):
            if m is not None:
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:  # cross-attention starts silent, as the gates do (PixArt-α)
            if self.cfg.text_dim:
                nn.init.zeros_(block.cross_proj.weight)
        c = self.cfg.hidden_size
        zero_rows = [slice(0, 6 * c)] if self.cfg.modulation == "adaln_zero" else [slice(2 * c, 3 * c),
                                                                                   slice(5 * c, 6 * c)]
        for block in self.blocks:
            for rows in zero_rows:  # the gates (adaLN-Zero); double_norm's scale/shift rows stay random
                block.modulation.weight[rows].zero_()
        if self.cfg.modulation == "adaln_zero":
            nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    # -- conditioning ---------------------------------------------------------------------------------------

    def embedding(self, t, labels=None, guidance=None, pooled=None) -> torch.Tensor:
        """The conditioning vector fed to every block (after its SiLU), computed in float32."""
        batch, device = t.shape[0], t.device
        with torch.autocast(device.type, enabled=False):
            emb = self.time_mlp2(silu(self.time_mlp1(self.time_embed(self.c_noise(t)))))
            if self.cfg.text_pooled_dim:
                emb = emb + self.pooled_mlp2(silu(self.pooled_mlp1(to_compute(pooled))))
            if self.label_embed is not None:
                dropout = self.cfg.label_dropout if self.training else 0.0
                onehot = class_labels(labels, batch, self.cfg.label_dim, device, dropout)
                emb = emb + self.label_embed(onehot.to(emb.dtype))
            elif labels is not None:
                raise ValueError("this network is unconditional (label_dim=0) but labels were given")
            if self.guidance_linear is not None:
                if isinstance(guidance, torch.Tensor) and guidance.ndim and tuple(guidance.shape) != (batch,):
                    raise ValueError(f"guidance must be a number or of shape [{batch}], got {tuple(guidance.shape)}")
                g = guidance_scales(guidance, batch, device, emb.dtype)
                emb = emb + self.guidance_linear(self.guidance_embed(g))  # added to the time embedding (§5.2)
            if self.cfg.modulation == "double_norm":
                emb = normalize(emb, dim=1)  # unit RMS (stabiliser (b))
            return silu(emb)

    # -- forward --------------------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, (H/p)(W/p), C·p·p] (row-major patches; channel, row, column inside); the same
        along any number of axes ([B, C, T, H, W] and [B, C, L] for video and audio)."""
        n, ch, grid, patch = x.shape[0], x.shape[1], self.grid, self.cfg.patch_shape
        k = len(grid)
        split = [s for g, q in zip(grid, patch, strict=True) for s in (g, q)]  # g₁, q₁, g₂, q₂ …
        order = (0, *range(2, 2 + 2 * k, 2), 1, *range(3, 3 + 2 * k, 2))  # batch, grid axes, channel, patch axes
        return x.reshape(n, ch, *split).permute(order).reshape(n, math.prod(grid), ch * math.prod(patch))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        n, ch, grid, patch = tokens.shape[0], self.cfg.img_channels, self.grid, self.cfg.patch_shape
        k = len(grid)
        order = (0, k + 1, *(a for i in range(k) for a in (1 + i, k + 2 + i)))  # batch, channel, (g_i, q_i) …
        sizes = (g * q for g, q in zip(grid, patch, strict=True))
        x = tokens.reshape(n, *grid, ch, *patch).permute(order).reshape(n, ch, *sizes)
        return x.clone() if x._base is not None else x  # a view (one channel) would trip FSDP2's backward hook

    def prompt(self, batch: int, text=None, text_mask=None, text_pooled=None) -> tuple | None:
        """(tokens in the transformer's width, key mask) of a text network's prompt, None for others
        (layers.check_prompt)."""
        if not check_prompt(self.cfg, batch, text, text_mask, text_pooled):
            return None
        return self.text_mlp2(gelu(self.text_mlp1(text))), text_mask

    def forward(self, x, t, labels=None, guidance=None, text=None, text_mask=None, text_pooled=None,
                return_weight: bool = False):
        check_input("DiT", x, t, self.shape)
        prompt = self.prompt(x.shape[0], text, text_mask, text_pooled)
        cond = self.embedding(t, labels, guidance, text_pooled)
        h = self.patch_embed(self.patchify(x)) + self.pos_embed
        for block in self.blocks:
            h = self.block(block, h, cond, prompt)
        with torch.autocast(x.device.type, enabled=False):
            shift, scale = self.final_modulation(to_compute(cond))[:, None, :].chunk(2, dim=-1)
        h = self.final_linear(modulate(h, scale, shift, self.cfg.modulation))
        out = self.unpatchify(h).to(x.dtype)
        return (out, self.weight(t)) if return_weight else out
