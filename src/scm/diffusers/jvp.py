"""Forward-mode AD through diffusers networks: `enable_jvp(model)` makes the JVP of sCM's training step (Lu & Song
2024, §5.1, eq. 6: cos t·sin t·dF/dt by one forward-mode pass) go through a diffusers model, in place.

What stands in the way in diffusers 0.42.1 (found by running `torch.func.jvp` and `torch.autograd.forward_ad` through
UNet2DModel, UNet2DConditionModel (SD, SDXL), DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel,
FluxTransformer2DModel and SanaTransformer2DModel on the CPU), and what `enable_jvp` does about it:

1. Attention. The processors call `F.scaled_dot_product_attention` (directly, or through diffusers' attention
   dispatcher with its native backend), whose fused kernels have no forward-AD formula (paper §5.1 names the same
   problem for FlashAttention). Each processor keeps its own code (self-, cross-, SD3's and Flux's joint attention with
   rotary embeddings and q/k norms, Sana's linear attention) but runs under `ExactAttention`, a `TorchFunctionMode`
   that computes every `scaled_dot_product_attention` call with `scm.nets.attention.attention`, the exact-JVP
   attention of App. F (blocked math on the CPU, the Triton kernels on CUDA, PyTorch's fused kernels in inference).
   Key padding masks (PixArt's and Sana's prompt masks: diffusers passes them as an additive bias of 0 and −10000)
   become scm's key mask: a padding key gets probability exactly 0 where diffusers gives it e^−10000 (0 in every
   float type), so the function is the same; any other mask, causal attention or attention dropout is refused
   (NotImplementedError). Inside it float64 stays float64 where a processor casts to float32 (Sana's linear
   attention, RMSNorm), so that a float64 network is a float64 function, the reference of the tests.
   xformers / sliced / NPU processors (the default maths, other kernels) are replaced by the default processor
   first; any other processor is refused.
2. GroupNorm. Its forward-AD formula views the primal as [N, G, −1], which fails ("view size is not compatible …")
   when the input is not contiguous; diffusers' attention blocks hand channels-last views to the next ResNet block's
   GroupNorm. Every `nn.GroupNorm` becomes a `ContiguousGroupNorm` (the same module, parameters and state-dict keys;
   its forward makes the input contiguous first, which fixes the tangent as well: checked for contiguous, transposed,
   channels-last and expanded tangents).
3. The sinusoidal timestep embedding (`Timesteps`) is computed in float32 whatever its input, so a float64 network
   (the finite-difference reference of the tests) would still see a float32 time. `Timesteps` modules become
   `WideTimesteps`: bit-identical for float32 (and lower) timesteps, float64 for float64 ones. diffusers' `RMSNorm`
   (Sana's caption norm, SD3's and Flux's q/k norms) computes its variance in float32 likewise: it becomes
   `WideRMSNorm`, float64 for float64 inputs, unchanged for any other.

No other op of these models lacks a forward-AD rule on torch 2.13 (convolutions, LayerNorm, RMSNorm, GELU/SiLU/ReLU,
rotary embeddings, the nearest-neighbour upsampler, embeddings and the adaLN modulations all have one).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from scm.nets.attention import attention

__all__ = ["EXACT_PROCESSORS", "ContiguousGroupNorm", "ExactAttention", "enable_jvp", "exact_processor_class",
           "exact_sdpa"]  # and WideTimesteps, made on first use

# diffusers processors that compute attention with scaled_dot_product_attention or plain ops, so that under
# ExactAttention their JVP is exact; and those computing the default processor's maths with other kernels.
EXACT_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "JointAttnProcessor2_0", "FluxAttnProcessor",
                    "FluxAttnProcessor2_0", "SanaLinearAttnProcessor2_0", "SanaAttnProcessor2_0")
DEFAULT_MATHS = ("XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU")
_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is
_NARROWING = (torch.Tensor.float, torch.Tensor.to)
_PADDING_BIAS = -1e4  # diffusers' additive mask: (1 − mask)·(−10000)


def _keep_wide(func, args, kwargs, out):
    """A float64 tensor that `.float()` / `.to(float32 …)` narrowed, kept float64 (module docstring, 1)."""
    src = args[0] if args else None
    if (isinstance(src, torch.Tensor) and src.dtype == torch.float64 and isinstance(out, torch.Tensor)
            and out.is_floating_point() and out.dtype != torch.float64):
        return src.to(out.device)
    return out


class ExactAttention(TorchFunctionMode):
    """Within it, `F.scaled_dot_product_attention` is scm's exact-JVP attention (module docstring, 1), and float64
    tensors are not narrowed to a lower float type by `Tensor.float` / `Tensor.to` (a float64 network stays a
    float64 function: the reference of the finite-difference tests). Every other op runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return exact_sdpa(*args, **kwargs)
        out = func(*args, **kwargs)
        return _keep_wide(func, args, kwargs, out) if func in _NARROWING else out


def _key_mask(mask: torch.Tensor, lead: tuple[int, ...], keys: int) -> torch.Tensor:
    """A SDPA mask that only masks keys (bool: True = attend; float: 0 = attend, ≤ −10⁴ or −inf = padding, the
    additive form diffusers makes from a prompt's attention mask) as scm's key_mask, bool [prod(lead), keys]."""
    if mask.ndim < 2 or mask.shape[-2] != 1 or mask.shape[-1] != keys:
        raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)}: only key padding masks (one row "
                                  f"per batch entry, [..., 1, {keys}]) have an exact JVP in scm")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool((keep | (mask <= _PADDING_BIAS)).all()):
            raise NotImplementedError("an additive attention bias that is not a padding mask (entries 0 or ≤ −10⁴) "
                                      "has no exact JVP in scm")
    keep = keep.reshape(*keep.shape[:-2], keys)
    return keep.expand(*lead, keys).reshape(-1, keys)


def exact_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`torch.nn.functional.scaled_dot_product_attention` by `scm.nets.attention.attention` (exact under backward
    AD, forward AD and torch.func): q [..., L, d], k [..., S, d], v [..., S, dv], a key padding mask or none.
    Refused (NotImplementedError): causal masks, attention dropout, grouped key/value heads, other masks."""
    if is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("scaled_dot_product_attention with is_causal, dropout_p or enable_gqa has no exact "
                                  "JVP in scm")
    lead = tuple(query.shape[:-2])
    if tuple(key.shape[:-2]) != lead or tuple(value.shape[:-2]) != lead:
        raise NotImplementedError(f"attention with q {tuple(query.shape)}, k {tuple(key.shape)}, v "
                                  f"{tuple(value.shape)}: broadcast batch dimensions have no exact JVP in scm")
    keys = key.shape[-2]
    mask = None if attn_mask is None else _key_mask(attn_mask, lead, keys)
    fold = lambda a: a.reshape(-1, *a.shape[-2:])  # noqa: E731  batch and heads into one dimension
    out = attention(fold(query), fold(key), fold(value), scale=scale, key_mask=mask)
    return out.reshape(*lead, query.shape[-2], value.shape[-1])


@functools.cache
def exact_processor_class(cls: type) -> type:
    """The attention-processor class `cls` whose call runs under `ExactAttention`: the same computation, line by line,
    with an exact JVP. Its `__call__` carries the original signature (diffusers reads it to pass keyword inputs)."""
    if getattr(cls, "_scm_exact", False):
        return cls

    def __call__(self, *args, **kwargs):
        with ExactAttention():
            return cls.__call__(self, *args, **kwargs)

    functools.update_wrapper(__call__, cls.__call__)
    return type(f"Exact{cls.__name__}", (cls,), {"__call__": __call__, "_scm_exact": True, "__module__": __name__})


class ContiguousGroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose input is made contiguous first: GroupNorm's forward-AD formula fails on non-contiguous
    (e.g. channels-last) inputs (module docstring, 2). Same parameters, same values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in the wider of the input's and the weights' types, then back: a bf16 input with fp32 weights (CPU autocast
        # leaves GroupNorm alone) would otherwise give a bf16 value with an fp32 tangent, which the next op refuses
        work = x.dtype if self.weight is None else torch.promote_types(x.dtype, self.weight.dtype)
        return F.group_norm(x.contiguous().to(work), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


@functools.cache
def _float64_class(cls: type) -> type:
    """`cls` (a module class that computes in float32 whatever its input, as diffusers' RMSNorm does) computing in
    float64 for float64 inputs (under `ExactAttention`'s rule), unchanged for any other input."""

    def forward(self, x, *args, **kwargs):
        if x.dtype != torch.float64:
            return cls.forward(self, x, *args, **kwargs)
        with ExactAttention():
            return cls.forward(self, x, *args, **kwargs)

    return type(f"Wide{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


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
    place, and return it: every attention module's processor runs under `ExactAttention` (its class becomes
    `exact_processor_class` of its own; its state is kept), every `nn.GroupNorm` becomes a `ContiguousGroupNorm`,
    every `Timesteps` a `WideTimesteps` and every `RMSNorm` a `WideRMSNorm` (module docstring). Parameters,
    buffers and state-dict keys are unchanged, and so are the outputs, up to float rounding in the attention. A
    processor that does not compute attention through PyTorch's `scaled_dot_product_attention` or plain ops (a
    non-native attention backend, a custom class) raises NotImplementedError naming its module."""
    from diffusers.models.embeddings import Timesteps
    from diffusers.models.normalization import RMSNorm

    wide = __getattr__("WideTimesteps")
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(module, "set_processor"):
            if type(processor).__name__ in DEFAULT_MATHS:
                from diffusers.models.attention_processor import AttnProcessor2_0

                module.set_processor(processor := AttnProcessor2_0())
            _check_processor(name, processor)
            processor.__class__ = exact_processor_class(type(processor))
        elif type(module) is nn.GroupNorm:
            module.__class__ = ContiguousGroupNorm
        elif type(module) is Timesteps:
            module.__class__ = wide
        elif type(module) is RMSNorm:
            module.__class__ = _float64_class(RMSNorm)
    return model


def _check_processor(name: str, processor) -> None:
    where = f"attention module {name or '(root)'}"
    cls = type(processor)
    base = cls.__mro__[1] if getattr(cls, "_scm_exact", False) else cls
    if base.__name__ not in EXACT_PROCESSORS or not base.__module__.startswith("diffusers."):
        raise NotImplementedError(f"{where}: its processor {base.__name__} is not one scm can differentiate exactly "
                                  f"(supported: {', '.join(EXACT_PROCESSORS)}); set diffusers' default processor")
    backend = getattr(processor, "_attention_backend", None)
    if backend is not None and str(getattr(backend, "value", backend)) != "native":
        raise NotImplementedError(f"{where}: attention backend {backend} (only PyTorch's native one has an exact JVP "
                                  "in scm)")
