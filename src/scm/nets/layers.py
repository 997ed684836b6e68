"""JVP-ready layers: magnitude-preserving (EDM2, Karras et al. 2024) building blocks plus sCM's time
conditioning (Lu & Song §4.1), the transformer's linear layer and adaptive double layer norm, and the label
and guidance inputs shared by the networks. Every layer is a pure function of its input and weights: nothing is
modified in place during a forward, so one code path serves the forward, the tangent (JVP) pass and sampling,
under `torch.autograd.forward_ad` and `torch.func.jvp` alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from scm._checks import check_t
from scm.nets.functional import conv2d, lincomb, linear, modulate, modulated_layer_norm, pixel_norm, scaled_cat
from scm.precision import to_compute

__all__ = [
    "FourierEmbedding",
    "Linear",
    "MPConv",
    "Network",
    "PositionalEmbedding",
    "adaptive_double_layer_norm",
    "adaptive_double_norm",
    "c_noise",
    "check_input",
    "class_labels",
    "guidance_scales",
    "mp_cat",
    "mp_silu",
    "mp_sum",
    "normalize",
]


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-8) -> torch.Tensor:
    """Scale x to unit RMS over `dim` (default: all but the first). Smooth everywhere, so its JVP is exact
    even at x = 0 (EDM2 adds eps to the norm instead; the two agree for |x| ≫ sqrt(eps))."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    return pixel_norm(x, dim, eps)


SILU_GAIN = 1 / 0.596  # mp_silu(x) = silu(x)·SILU_GAIN; blocks fold the gain into the next layer's weights


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (EDM2 eq. 81): unit-variance Gaussian in, unit magnitude out."""
    return F.silu(x) * SILU_GAIN


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend (1 − t)·a + t·b of independent unit-magnitude inputs (EDM2 eq. 88)."""
    c = math.sqrt((1 - t) ** 2 + t**2)
    return lincomb(a, b, (1 - t) / c, t / c)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving channel concatenation with balance t between a and b (EDM2 eq. 103)."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return scaled_cat(a, b, c / math.sqrt(na) * (1 - t), c / math.sqrt(nb) * t)


def adaptive_double_norm(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Adaptive double normalization (paper §4.1): norm(y) ⊙ pnorm(s(t)) + pnorm(b(t)), where pnorm
    normalizes the embedding's scale s and shift b over channels (PixelNorm). We use the pixel norm of y as
    norm(·) (EDM2 blocks have no GroupNorm) and divide the sum by √2, which keeps unit magnitude."""
    s = (normalize(scale, dim=1) / math.sqrt(2)).to(y.dtype)[:, :, None, None]
    b = (normalize(shift, dim=1) / math.sqrt(2)).to(y.dtype)[:, :, None, None]
    return modulate(normalize(y, dim=1), s, b)


def adaptive_double_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Adaptive double normalization (paper §4.1) for tokens x [B, L, C]: LayerNorm(x) ⊙ pnorm(s) + pnorm(b),
    divided by √2 as in `adaptive_double_norm`, with per-example scale s and shift b [B, 1, C] pixel-normalized
    over channels (in at least float32)."""
    s, b = normalize(to_compute(scale), dim=-1), normalize(to_compute(shift), dim=-1)
    return modulated_layer_norm(x, s, b, gain=1 / math.sqrt(2))  # the gain inside the op: no extra tangent ops


def class_labels(labels: torch.Tensor | None, batch: int, label_dim: int, device, dropout: float = 0.0) -> torch.Tensor:
    """One-hot (or given soft) labels [B, label_dim], zeros = unconditional; with `dropout` > 0 each row is
    zeroed with that probability (label dropout for classifier-free guidance), drawn with torch.rand from the
    global RNG so that a replayed pass (scm._rng.rng_replayer) drops the same rows.

    Label values are not read here (that would stall a GPU on every call): they are checked where they
    enter (data loaders, samplers); an index outside [0, label_dim) gives a zero row, i.e. no class."""
    if labels is None:
        return torch.zeros(batch, label_dim, device=device)
    if labels.ndim == 1 and not labels.is_floating_point():
        if labels.shape[0] != batch:
            raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
        onehot = (labels[:, None] == torch.arange(label_dim, device=labels.device)).float()
    elif labels.shape == (batch, label_dim):
        onehot = labels.float()
    else:
        raise ValueError(f"labels must be class indices of shape [{batch}] or a [{batch}, {label_dim}] array")
    if dropout:
        keep = torch.rand(batch, device=device) >= dropout
        onehot = onehot * keep[:, None]
    return onehot


def guidance_scales(guidance, batch: int, device, dtype: torch.dtype) -> torch.Tensor:
    """The guidance-scale input as a [B] tensor of `dtype`: 1 when None, a number or 0-d tensor broadcast."""
    g = torch.ones(batch, device=device) if guidance is None else torch.as_tensor(guidance, device=device)
    return g.to(dtype).expand(batch) if g.ndim == 0 else g.to(dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed by `scm.nets.functional.linear`, whose JVP skips
    the weight-tangent product when the weights carry no tangent. Honours autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()) (EDM2 eq. 47) with
    weight normalization: the weight used is normalize(W)·gain/sqrt(fan_in), computed out of place.

    EDM2 also renormalizes the stored weight in place at the start of every training forward ("forced"
    weight normalization, eq. 66). Doing that inside a tangent pass would change the weights between the
    passes of one step, so here it is a separate call, `normalize_weight_()`, that the training loop makes
    after each optimizer step (which is when EDM2's in-forward version takes effect too).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = normalize(to_compute(self.weight)) * (gain / math.sqrt(self.fan_in))
        if w.ndim == 2:
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            return x.to(dtype) @ w.to(dtype).t()
        return conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalization (EDM2 eq. 66): project the stored weight back to unit RMS per output."""
        self.weight.copy_(normalize(to_compute(self.weight)).to(self.weight.dtype))


class PositionalEmbedding(nn.Module):
    """sqrt(2)·[cos(ω_i c), sin(ω_i c)] with ω_i = max_positions^(−i/half), i < half (DDPM++/EDM): the
    positional time embedding of §4.1, fed c_noise(t) = t (no ×1000). Unit magnitude, computed in float32
    whatever the autocast state (low-precision time embeddings destabilise the JVP; paper §4.1, and
    NVlabs/rcm's maintainers fixed sCM's gradient spikes on SD3.5 the same way). Its largest frequency is 1,
    so ∂emb/∂t stays O(1)."""

    def __init__(self, num_channels: int, max_positions: float = 10_000.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"PositionalEmbedding needs an even number of channels, got {num_channels}")
        half = num_channels // 2
        freqs = max_positions ** (-torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        with torch.autocast(c.device.type, enabled=False):
            c = to_compute(c)
            a = c[:, None] * self.freqs.to(c.dtype)[None, :]
            return torch.cat([torch.cos(a), torch.sin(a)], dim=1) * math.sqrt(2)


class FourierEmbedding(nn.Module):
    """sqrt(2)·cos(2π(s·ω_i·c + φ_i)), ω ~ N(0, 1), φ ~ U[0, 1): EDM2's Fourier features with scale s.
    Kept for ablations: with a large s (e.g. 16) and c_noise = log σ, ∂F/∂t explodes as t → π/2 (§4.1)."""

    def __init__(self, num_channels: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # fixed features: the same for every instance
        freqs = 2 * math.pi * scale * torch.randn(num_channels, generator=g, device="cpu")
        phases = 2 * math.pi * torch.rand(num_channels, generator=g, device="cpu")
        self.register_buffer("freqs", freqs.to(torch.get_default_device()))
        self.register_buffer("phases", phases.to(torch.get_default_device()))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        with torch.autocast(c.device.type, enabled=False):
            c = to_compute(c)
            a = c[:, None] * self.freqs.to(c.dtype)[None, :] + self.phases.to(c.dtype)[None, :]
            return torch.cos(a) * math.sqrt(2)


def c_noise(t: torch.Tensor, kind: str = "t", sigma_d: float = 0.5) -> torch.Tensor:
    """The time input of the networks' embeddings: c_noise(t) = t (§4.1, eq. 7), in float32 at least, or, for
    ablations (kind="log_sigma"), EDM2's log(σ_d·tan t)/4."""
    t = to_compute(t)
    if kind == "t":
        return t
    return torch.log(sigma_d * torch.tan(t.clamp(1e-7, math.pi / 2 - 1e-7))) / 4


def check_input(net: str, x: torch.Tensor, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Shapes only (values are checked where data enters): x [B, *shape] (images: shape = (C, H, W)), t [B]."""
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{net} expects x of shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")
    check_t(t, x)


def check_prompt(cfg, batch: int, text=None, text_mask=None, text_pooled=None) -> bool:
    """Whether a network of config `cfg` (its `text_dim`, `text_pooled_dim`) takes this call's prompt: shapes checked
    (values are checked where prompts are encoded); a prompt given to a network without text is refused, as is a
    text network called without one. text [B, T, text_dim] (float), text_mask [B, T] (bool, True on real tokens),
    text_pooled [B, text_pooled_dim] where the config has one."""
    if not getattr(cfg, "text_dim", 0):
        if text is not None or text_pooled is not None:
            raise ValueError("this network takes no prompt (text_dim=0) but one was given")
        return False
    want = {"text": (text, (batch, None, cfg.text_dim)), "text_mask": (text_mask, (batch, None))}
    if cfg.text_pooled_dim:
        want["text_pooled"] = (text_pooled, (batch, cfg.text_pooled_dim))
    for name, (value, shape) in want.items():
        if value is None:
            raise ValueError(f"this network takes a prompt: {name} is missing")
        if value.ndim != len(shape) or any(s not in (None, v) for s, v in zip(shape, value.shape, strict=True)):
            raise ValueError(f"{name} must have shape [{', '.join('T' if s is None else str(s) for s in shape)}]"
                             f", got {tuple(value.shape)}")
    if text_mask.shape[1] != text.shape[1] or text_mask.dtype != torch.bool:
        raise ValueError(f"text_mask must be bool [{batch}, {text.shape[1]}], got {text_mask.dtype} "
                         f"{tuple(text_mask.shape)}")
    return True


def check_text_widths(cfg) -> None:
    """A config's prompt widths: ints >= 0, and a pooled width only with a token width."""
    name = type(cfg).__name__
    for field in ("text_dim", "text_pooled_dim"):
        v = getattr(cfg, field)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name}.{field} must be an int >= 0, got {v!r}")
    if cfg.text_pooled_dim and not cfg.text_dim:
        raise ValueError(f"{name}.text_pooled_dim needs text_dim (a pooled prompt comes with its tokens)")


class Network(nn.Module):
    """What every scm network shares (U-Net, DiT, diffusers students): its config `cfg`, the run's σ_d (given by
    whoever builds it: a run has one σ_d, `loss.sigma_d`), the time input c_noise(t) (§4.1: t itself, or the
    config's `c_noise` ablation), the adaptive log-weight w_φ(t) of eq. 8 from the subclass's `weight_embed` and
    `weight_linear`, EDM2's forced weight normalization of its magnitude-preserving layers, its parameter count.
    `reads_no_class`: a class index outside [0, label_dim) is no class (`class_labels`: a zero row), so classifier-free
    guidance may stack the unconditional rows with the conditional ones (`scm.conditioning.NO_CLASS`)."""

    reads_no_class = True

    def __init__(self, cfg, sigma_d: float):
        super().__init__()
        if not (isinstance(sigma_d, (int, float)) and math.isfinite(sigma_d) and sigma_d > 0):
            raise ValueError(f"{type(self).__name__}: sigma_d must be a positive number, got {sigma_d!r}")
        self.cfg, self.sigma_d = cfg, float(sigma_d)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one input (and output): (C, H, W) for images."""
        return self.cfg.img_shape

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        return c_noise(t, getattr(self.cfg, "c_noise", "t"), self.sigma_d)

    def checkpointing(self) -> bool:
        """Whether this call checkpoints its blocks (`block`): the config asks for it and grad mode is on;
        RuntimeError inside a forward-AD dual level (the fused pass)."""
        if not (getattr(self.cfg, "checkpointing", False) and torch.is_grad_enabled()):
            return False
        from torch.autograd import forward_ad

        if forward_ad._current_level >= 0:
            raise RuntimeError("activation checkpointing (net.checkpointing) needs the separate tangent pass "
                               "(loss.fused_pass=false): the fused pass runs the tangent inside the forward")
        return True

    def block(self, block: nn.Module, *args):
        """block(*args), through activation checkpointing when the config asks for it (`checkpointing`) and a
        backward may follow (grad mode): the block's activations are not kept but recomputed in the backward pass,
        with the RNG state replayed (dropout draws the same masks), so the gradients are those of the stored pass
        bit for bit where the recomputation repeats the forward's kernels (tested).

        sCM's step then takes the tangent in its own pass under no_grad (it stores nothing) and the checkpointed
        forward of F for the backward (`loss.fused_pass=false`, set by the run). The fused pass cannot be
        checkpointed: its forward also runs the tangent's operations, whose saved values a recomputation without the
        tangent would not repeat (checkpointing matches saved values one by one); recomputing the tangent too would
        cost the separate pass's work anyway. A dual level with grad mode on is refused (RuntimeError)."""
        if self.checkpointing():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """The adaptive log-weight w_φ(t) of eq. 8 (EDM2's −logvar), shape [B], computed in float32."""
        with torch.autocast(t.device.type, enabled=False):
            return self.weight_linear(self.weight_embed(self.c_noise(t)))[:, 0].clone()  # not a view (FSDP2's hook)

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """EDM2's forced weight normalization of every MPConv; call after each optimizer step (see MPConv)."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.normalize_weight_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
