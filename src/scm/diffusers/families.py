"""How scm calls each diffusers network class it distils: one `Family` a class, in one table.

A diffusers network takes its own inputs besides (x, timestep): class labels, prompt embeddings under each model's
names, packed latents and position ids (Flux), size conditions (SDXL), a guidance scale (Flux-dev, Sana-Sprint).
scm's conditioning is always the same (`scm.conditioning`): `labels`, `guidance` and, for prompts, `text` [B, T, D],
`text_mask` [B, T] (True on real tokens) and `text_pooled` [B, P]. A family maps one onto the other:

| class | prompt tokens | padding mask | pooled | student's guidance input |
|---|---|---|---|---|
| UNet2DModel | – | – | – | scm's, on `time_embedding` |
| UNet2DConditionModel (SD, SDXL) | encoder_hidden_states | encoder_attention_mask | SDXL: text_embeds | idem |
| DiTTransformer2DModel | – (class labels) | – | – | scm's, on each block's `norm1.emb` |
| PixArtTransformer2DModel | encoder_hidden_states | encoder_attention_mask | – | scm's, `adaln_single.emb` |
| SD3Transformer2DModel | encoder_hidden_states (joint) | none (all tokens) | pooled_proj. | scm's, `time_text_embed` |
| FluxTransformer2DModel | encoder_hidden_states (joint) | none (all tokens) | pooled_proj. | its own |
| SanaTransformer2DModel | encoder_hidden_states (cross) | encoder_attention_mask | – | its own |

Models that attend to every token (SD3, Flux, SDXL's U-Net) see exactly the tokens their pipelines give them, padding
included: prompts for them are encoded by the pipeline's own encoders (`scm.diffusers.pipeline_text`), which store an
all-True mask. SDXL's size conditions (`time_ids`) are those of an uncropped image of the latents' size × 8 (the
pipeline's default for that size); PixArt-α's resolution and aspect ratio the same.

The guidance input (§5.2; Sana-Sprint's distilled-CFG student): where the class has a guidance embedder of its own
(Flux's and Sana's `guidance_embeds`), the student is the same class with it switched on, its output layer
zero-initialised (a fresh student equals its teacher at every scale) and fed s times its config's
`guidance_embeds_scale` (Sana-Sprint's convention; Flux: s itself), so the student stays a diffusers class of the same
kind; elsewhere scm adds its own zero-initialised embedding to the time embedding (`scm.diffusers.net`). A teacher
with such an input (Flux-dev) is given the guidance scale the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from scm.diffusers.convert import constant_tensor
from scm.errors import ConfigError

__all__ = ["FAMILIES", "GENERIC", "Family", "family_of", "latent_shape"]

VAE_FACTOR = 8  # pixels per latent of the VAEs of SDXL and PixArt-α (their size conditions are in pixels)


@dataclass(frozen=True)
class Family:
    """One diffusers network class as scm calls it (module docstring). `call(model, x, timestep, **cond)` returns
    the model's raw prediction for scm's conditioning `cond`; `time_embeddings(model)` the modules whose output scm's
    guidance embedding is added to (None: the class has its own guidance input, switched on by `native_guidance`, a
    config update; `rename`, where given, maps a teacher's state-dict key to the student's where that renames
    modules)."""

    model_class: str
    call: Callable[..., torch.Tensor]
    time_embeddings: Callable[[nn.Module], list[nn.Module]] | None
    text_keys: tuple[str, str] | None = None   # its config's prompt-token width and pooled width (None: no prompts)
    native_guidance: dict = field(default_factory=dict)
    guidance_scale_key: str | None = None      # its config's factor on the guidance input (Sana-Sprint's)
    rename: Callable[[str], str] | None = None
    packed: bool = False                       # takes 2×2-packed latent tokens (Flux): in_channels = 4 × C
    any_size: bool = False                     # takes latents of other sizes than its sample_size (the data's)

    def widths(self, config: Mapping) -> tuple[int, int]:
        """(D, P): the widths of the prompt tokens and of the pooled prompt embedding a model takes (0: none)."""
        if self.text_keys is None:
            return 0, 0
        tokens, pooled = (config.get(k) if k else 0 for k in self.text_keys)
        if self.model_class == "UNet2DConditionModel":  # SDXL: text_embeds and 6 size conditions, embedded together
            pooled = (config.get("projection_class_embeddings_input_dim") or 0) - 6 * (
                config.get("addition_time_embed_dim") or 0) if config.get("addition_embed_type") == "text_time" else 0
        return int(tokens or 0), int(pooled or 0)

    def own_guidance(self, config: Mapping) -> bool:
        """Whether a model of this config takes a guidance scale itself."""
        return bool(self.native_guidance) and all(config.get(k) == v for k, v in self.native_guidance.items())


def _output(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out


def _prompt(cond: dict, model_class: str, pooled: bool = False) -> tuple:
    text, mask, vec = cond.pop("text", None), cond.pop("text_mask", None), cond.pop("text_pooled", None)
    if text is None and "encoder_hidden_states" in cond:  # the model's own keyword, given directly
        return cond.pop("encoder_hidden_states"), cond.pop("encoder_attention_mask", None), vec
    if text is None:
        raise ConfigError(f"{model_class} takes a prompt: give text (prompt embeddings [B, T, D])", key="text")
    if pooled and vec is None:
        raise ConfigError(f"{model_class} takes a pooled prompt embedding: give text_pooled [B, P] (encode the "
                          "prompts with its pipeline's encoders)", key="text_pooled")
    return text, mask, vec


def _guidance_input(model, guidance, x: torch.Tensor, family: Family) -> torch.Tensor | None:
    """The guidance scale [B] a model with its own guidance input takes (None for others)."""
    if not family.own_guidance(model.config):
        return None
    if guidance is None:
        raise ConfigError(f"{family.model_class} takes a guidance scale (guidance_embeds): give guidance",
                          key="guidance")
    g = torch.as_tensor(guidance, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
    factor = model.config.get(family.guidance_scale_key, 1.0) if family.guidance_scale_key else 1.0
    return g * factor


def _mask_input(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """diffusers' encoder_attention_mask (1 keep, 0 padding) from scm's bool mask."""
    return None if mask is None else mask.to(x.dtype)


# -- the classes ---------------------------------------------------------------------------------------------------
def _call_unet(model, x, timestep, *, labels=None, guidance=None, **cond):
    kwargs = {}
    if "text" in cond:
        text, mask, vec = _prompt(cond, "UNet2DConditionModel", model.config.get("addition_embed_type") == "text_time")
        kwargs["encoder_hidden_states"] = text
        if mask is not None:  # all True from SD's and SDXL's own encoders: the same as no mask
            kwargs["encoder_attention_mask"] = _mask_input(mask, x)
        if model.config.get("addition_embed_type") == "text_time":
            h, w = (VAE_FACTOR * s for s in x.shape[-2:])
            ids = constant_tensor((h, w, 0, 0, h, w), x.dtype, x.device).expand(x.shape[0], 6)
            kwargs["added_cond_kwargs"] = {"text_embeds": vec, "time_ids": ids}
    if labels is not None:
        kwargs["class_labels"] = labels
    return _output(model(x, timestep, **kwargs, **cond))


def _call_dit(model, x, timestep, *, labels=None, guidance=None, **cond):
    if labels is not None:
        cond["class_labels"] = labels
    return _output(model(x, timestep=timestep, **cond))


def _call_pixart(model, x, timestep, *, labels=None, guidance=None, **cond):
    text, mask, _ = _prompt(cond, "PixArtTransformer2DModel")
    added = {"resolution": None, "aspect_ratio": None}
    if model.use_additional_conditions:  # PixArt-α at 1024²: the image's size in pixels and its aspect ratio
        h, w = (VAE_FACTOR * s for s in x.shape[-2:])
        added = {"resolution": constant_tensor((h, w), x.dtype, x.device).expand(x.shape[0], 2),
                 "aspect_ratio": torch.full((x.shape[0], 1), h / w, dtype=x.dtype, device=x.device)}
    return _output(model(x, encoder_hidden_states=text, encoder_attention_mask=_mask_input(mask, x),
                         timestep=timestep, added_cond_kwargs=added, **cond))


def _call_sd3(model, x, timestep, *, labels=None, guidance=None, **cond):
    text, _, vec = _prompt(cond, "SD3Transformer2DModel", pooled=True)
    return _output(model(x, encoder_hidden_states=text, pooled_projections=vec, timestep=timestep, **cond))


def _pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → Flux's tokens [B, H/2·W/2, 4C] (2×2 patches, as FluxPipeline packs latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(tokens: torch.Tensor, shape) -> torch.Tensor:
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _flux_ids(x: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's position ids: (0, row, column) per latent patch, zeros per prompt token."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, :].expand(h, w)
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    return img, torch.zeros(tokens, 3, device=x.device, dtype=x.dtype)


def _call_flux(model, x, timestep, *, labels=None, guidance=None, **cond):
    text, _, vec = _prompt(cond, "FluxTransformer2DModel", pooled=True)
    img_ids, txt_ids = _flux_ids(x, text.shape[1])
    out = model(_pack(x), encoder_hidden_states=text, pooled_projections=vec, timestep=timestep / 1000,
                img_ids=img_ids, txt_ids=txt_ids, guidance=_guidance_input(model, guidance, x, FAMILIES[
                    "FluxTransformer2DModel"]), **cond)  # Flux multiplies timestep and guidance by 1000 itself
    return _unpack(_output(out), x.shape)


def _call_sana(model, x, timestep, *, labels=None, guidance=None, **cond):
    text, mask, _ = _prompt(cond, "SanaTransformer2DModel")
    scale = float(model.config.get("timestep_scale", 1.0))  # SanaPipeline multiplies the timestep by it
    return _output(model(x, encoder_hidden_states=text, encoder_attention_mask=_mask_input(mask, x),
                         timestep=timestep * scale,
                         guidance=_guidance_input(model, guidance, x, FAMILIES["SanaTransformer2DModel"]), **cond))


def _sana_rename(key: str) -> str:
    """Sana's time embedding as Sana-Sprint's (guidance_embeds moves the timestep embedder up one level)."""
    return key.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder.")


FAMILIES: dict[str, Family] = {f.model_class: f for f in (
    Family("UNet2DModel", _call_unet, lambda m: [m.time_embedding]),
    Family("UNet2DConditionModel", _call_unet, lambda m: [m.time_embedding], ("cross_attention_dim", "")),
    Family("DiTTransformer2DModel", _call_dit, lambda m: [b.norm1.emb for b in m.transformer_blocks]),
    Family("PixArtTransformer2DModel", _call_pixart, lambda m: [m.adaln_single.emb], ("caption_channels", ""),
           any_size=True),
    Family("SD3Transformer2DModel", _call_sd3, lambda m: [m.time_text_embed],
           ("joint_attention_dim", "pooled_projection_dim"), any_size=True),
    Family("FluxTransformer2DModel", _call_flux, None, ("joint_attention_dim", "pooled_projection_dim"),
           native_guidance={"guidance_embeds": True}, packed=True, any_size=True),
    Family("SanaTransformer2DModel", _call_sana, None, ("caption_channels", ""),
           native_guidance={"guidance_embeds": True}, guidance_scale_key="guidance_embeds_scale",
           rename=_sana_rename, any_size=True),
)}


# Any other model with diffusers' calling convention, model(x, timestep=…, class_labels=…, **its keywords) -> .sample:
# a teacher scm does not know by name (its keyword inputs are passed as given).
GENERIC = Family("", _call_dit, None)


def family_of(model_or_class, *, generic: bool = False) -> Family:
    """The family of a diffusers model (or its class name); for another class `GENERIC` when `generic` (a teacher),
    else ConfigError."""
    name = model_or_class if isinstance(model_or_class, str) else _class_name(model_or_class)
    if name not in FAMILIES and generic:
        return GENERIC
    if name not in FAMILIES:
        raise ConfigError(f"{name} is not a network scm can call (supported: {', '.join(FAMILIES)})", key="teacher")
    return FAMILIES[name]


def _class_name(model) -> str:
    """The diffusers class of a model, also once wrapped by a subclass of it (FSDP2's `fully_shard` makes one)."""
    return next((c.__name__ for c in type(model).__mro__ if c.__name__ in FAMILIES), type(model).__name__)


def latent_shape(config: Mapping, name: str, shape: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """(C, H, W) of a model's input: `shape` where given (the data's, checked against the model's channels), else
    from its config (in_channels, sample_size, in latents); None for Flux, which has no size of its own (its
    in_channels are those of 2×2-packed latents: C = in_channels/4, H and W even). The transformers (`any_size`)
    take other sizes than their sample_size too: their position embeddings are made per size (or cropped)."""
    packed = name in FAMILIES and FAMILIES[name].packed
    channels = int(config.get("in_channels") or 0) // (4 if packed else 1)
    if shape is None:
        size = config.get("sample_size")
        if size is None or not channels or packed:
            return None
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (channels, *(int(v) for v in hw))
    shape = tuple(int(v) for v in shape)
    if channels and shape[0] != channels:
        raise ConfigError(f"{name} takes {channels}-channel latents, the data has {shape[0]} channels", key="data")
    if packed and (len(shape) != 3 or shape[1] % 2 or shape[2] % 2):
        raise ConfigError(f"{name} packs 2×2 latent patches: the latents' height and width must be even, got "
                          f"{shape[1:]}", key="data")
    return shape
