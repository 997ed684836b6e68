"""Forward-mode AD through diffusers networks: `enable_jvp(model)` makes the JVP of sCM's training step (Lu & Song
2024, §5.1, eq. 6: cos t·sin t·dF/dt by one forward-mode pass) go through a diffusers model, in place.

What stands in the way in diffusers 0.42.1 (found by running `torch.func.jvp` and `torch.autograd.forward_ad` through
UNet2DModel, UNet2DConditionModel and DiTTransformer2DModel on the CPU), and what `enable_jvp` does about it:

1. Attention. The default processor (`AttnProcessor2_0`) calls `F.scaled_dot_product_attention`, whose fused kernels
   have no forward-AD formula (paper §5.1 names the same problem for FlashAttention). Every diffusers `Attention`
   module gets a `JVPAttnProcessor`: the default processor's computation line by line, with softmax(s·QKᵀ)V done by
   `scm.nets.attention.attention`, the exact-JVP attention of App. F (blocked math on the CPU, the fused Triton
   kernels on CUDA when Triton is installed). Softmax runs in at least float32 there, as diffusers' upcast options
   ask for; masks are refused (NotImplementedError): none of the supported models passes one.
2. GroupNorm. Its forward-AD formula views the primal as [N, G, −1], which fails ("view size is not compatible …")
   when the input is not contiguous; diffusers' attention blocks hand channels-last views to the next ResNet block's
   GroupNorm. Every `nn.GroupNorm` becomes a `ContiguousGroupNorm` (the same module, parameters and state-dict keys;
   its forward makes the input contiguous first, which fixes the tangent as well: checked for contiguous, transposed,
   channels-last and expanded tangents).
3. The sinusoidal timestep embedding (`Timesteps`) is computed in float32 whatever its input, so a float64 network
   (the finite-difference reference of the tests) would still see a float32 time. `Timesteps` modules become
   `WideTimesteps`: bit-identical for float32 (and lower) timesteps, float64 for float64 ones.

No other op of these three models lacks a forward-AD rule on torch 2.13 (convolutions, LayerNorm, GELU/SiLU, the
nearest-neighbour upsampler, embeddings and the adaLN-Zero modulation all have one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scm.nets.attention import attention

__all__ = ["ContiguousGroupNorm", "JVPAttnProcessor", "enable_jvp"]  # and WideTimesteps, made on first use

# Processors whose computation JVPAttnProcessor reproduces (without masks): diffusers' default ones and the
# memory-saving variants of the same maths.
REPLACEABLE = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
               "AttnProcessorNPU", "JVPAttnProcessor")


class JVPAttnProcessor:
    """diffusers' default attention processor (`AttnProcessor2_0`; `AttnProcessor` when `qk_norm=False`) computed
    with scm's exact-JVP attention (module docstring, 1). Reproduces: spatial_norm (with `temb`), 4-D inputs
    [B, C, H, W] flattened to tokens and back, group_norm, cross-attention on `encoder_hidden_states` (with
    norm_cross), per-head norm_q / norm_k, the scale `attn.scale` (1/√d_head unless scale_qk=False), the output
    projection and its dropout, residual_connection and rescale_output_factor."""

    def __init__(self, qk_norm: bool = True):
        self.qk_norm = qk_norm  # AttnProcessor2_0 applies attn.norm_q / norm_k, the older AttnProcessor does not

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("JVPAttnProcessor: attention masks are not supported (scm's JVP attention has "
                                      "no mask input)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2).contiguous()).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        split = lambda a: a.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # noqa: E731  [B, heads, L, d]
        query, key, value = split(query), split(key), split(value)
        if self.qk_norm and attn.norm_q is not None:
            query = attn.norm_q(query)
        if self.qk_norm and attn.norm_k is not None:
            key = attn.norm_k(key)
        fold = lambda a: a.reshape(batch * heads, a.shape[2], head_dim)  # noqa: E731  heads into the batch
        out = attention(fold(query), fold(key), fold(value), scale=attn.scale)  # exact JVP (App. F)
        out = out.reshape(batch, heads, -1, head_dim).transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = out.to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout
        if four_d:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ContiguousGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose input is made contiguous first: GroupNorm's forward-AD formula fails on non-contiguous
    (e.g. channels-last) inputs (module docstring, 2). Same parameters, same values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def _timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float, scale: float,
                        max_period: int = 10_000) -> torch.Tensor:
    """diffusers' `get_timestep_embedding`, op for op, in float32, or float64 for float64 timesteps."""
    dtype = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=dtype, device=timesteps.device)
    freqs = torch.exp(exponent / (half - shift))
    emb = scale * (timesteps[:, None].to(dtype) * freqs[None, :])
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def _timesteps_class():
    from diffusers.models.embeddings import Timesteps

    class WideTimesteps(Timesteps):
        """diffusers' `Timesteps` computed in float64 for float64 timesteps (module docstring, 3)."""

        def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
            return _timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift,
                                       self.scale)

    WideTimesteps.__module__, WideTimesteps.__qualname__ = __name__, "WideTimesteps"
    return WideTimesteps


def __getattr__(name: str):
    if name == "WideTimesteps":  # built on first use: diffusers is optional
        cls = _timesteps_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable_jvp(model: nn.Module) -> nn.Module:
    """Make forward-mode AD (`torch.autograd.forward_ad`, `torch.func.jvp`) go through a diffusers network, in
    place, and return it: every `Attention` module gets a `JVPAttnProcessor`, every `nn.GroupNorm` becomes a
    `ContiguousGroupNorm` and every `Timesteps` a `WideTimesteps` (module docstring). Parameters, buffers and
    state-dict keys are unchanged, and so are the outputs, up to float rounding in the attention. An attention
    module with a processor or a feature the JVP processor does not reproduce (added key/value projections, fused
    projections, grouped key/value heads, a custom processor) raises NotImplementedError naming it."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import Timesteps

    wide = __getattr__("WideTimesteps")
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            _check_attention(name, module)
            current = type(module.processor).__name__
            qk_norm = current != "AttnProcessor" and getattr(module.processor, "qk_norm", True)
            module.set_processor(JVPAttnProcessor(qk_norm=qk_norm))
        elif type(module) is nn.GroupNorm:
            module.__class__ = ContiguousGroupNorm
        elif type(module) is Timesteps:
            module.__class__ = wide
    return model


def _check_attention(name: str, module) -> None:
    where = f"attention module {name or '(root)'}"
    processor = type(module.processor).__name__
    if processor not in REPLACEABLE:
        raise NotImplementedError(f"{where}: its processor {processor} is not diffusers' default attention; "
                                  "scm's JVP processor reproduces only that")
    if getattr(module, "added_kv_proj_dim", None) is not None:
        raise NotImplementedError(f"{where}: added key/value projections (joint attention) are not supported")
    if getattr(module, "fused_projections", False):
        raise NotImplementedError(f"{where}: fused QKV projections are not supported (unfuse them first)")
    if getattr(module, "inner_kv_dim", module.inner_dim) != module.inner_dim:
        raise NotImplementedError(f"{where}: grouped key/value heads (kv_heads) are not supported")
