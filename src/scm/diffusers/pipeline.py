"""scm runs as diffusers pipelines: `SCMModel`, any scm network as a diffusers model, and `SCMPipeline`,
consistency sampling (Lu & Song 2024, §5.1–5.3) driven by diffusers' own `SCMScheduler`.

    from scm.diffusers import SCMPipeline
    pipe = SCMPipeline.from_pretrained("exported")            # written by `scm export RUN exported`
    images = pipe(batch_size=4, num_inference_steps=2, seed=0).images     # = `scm sample --steps 2 --seed 0 --n 4`
    images = pipe("a thick seven", num_inference_steps=2, seed=0).images  # a text run: = `scm sample --prompt …`

The maths is TrigFlow's (§3): x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d²I) (eq. 2); the network sees x_t/σ_d and t
and returns F, and the consistency function is f = cos t·x_t − sin t·σ_d·F (eq. 5). `SCMScheduler.step` computes
exactly this x0-estimate from `model_output` = σ_d·F (its "trigflow" prediction type), then re-noises it to the
next time with fresh σ_d·ε: the multistep sampler of §5.3.

Times. The pipeline samples at the paper's times, not at `SCMScheduler.set_timesteps`' defaults (1.5708 and 1.3,
Sana-Sprint's): t_max = arctan(σ_max/σ_d) with σ_max = 80 (App. G.2; arctan(160) ≈ 1.56454 for σ_d = 0.5) and,
for two steps, t_mid = 1.1 (§5.2) or the exported run's own `t_mid`. Both are stored in the pipeline's
configuration (model_index.json: `t_max`, `t_mid`) and passed to `set_timesteps` explicitly as the whole schedule;
N > 2 steps use scm's own schedule (`scm.sampling.consistency_times`), and `timesteps=` gives any decreasing times.

Noise. Exactly `scm sample`'s (`scm.generate`): the initial noise σ_d·ε is drawn first, then each re-noising
draws σ_d·ε from the same generator(s), in float32. With `seed=s` image i has its own generator seeded with
mix_seed(s, i) (`scm.generate.image_generators`) and, for a class-conditional model without `class_labels`,
class i mod the number of classes: `pipe(batch_size=n, seed=s)` reproduces `scm sample --n n --seed s`. A list of
per-image `torch.Generator`s, one generator, or none (the global RNG) may be given instead, as in diffusers.

Prompts. A text-to-image run's pipeline records the run's `scm.text.TextConfig` (config `text`: its encoder's
record, token count, widths and storage dtype) and encodes prompts exactly as `scm sample` does
(`scm.text.encode_prompts`: the same encoder, rounded to the dtype the training captions were stored in). The
first argument is the prompt: one for all images, or a list of which image i takes prompt i mod its length (as
`scm sample --prompt a --prompt b`); `batch_size` defaults to the number of prompts times `num_images_per_prompt`
(each prompt's images together, as diffusers pipelines and `scm sample --n-per-prompt` order them). A transformers
text encoder travels with the export: its folder (weights as safetensors, tokenizer files) is the component
`text_encoder` (`SCMTextEncoder`), so the pipeline loads from anywhere with that copy, checked against the run's
recorded weights digest; the builtin toy encoder needs no files.

A run on latents carries its VAE (`vae`) and the per-channel normalisation of its data (App. G.1): samples are
denormalised, x·σ_c/σ_d + µ_c, and decoded exactly as `scm.data.latents.decode` does.

Video and audio. A video or audio run's pipeline records the data's modality and rate (config `media`, as the run's
RUN/media.json: {"modality": "video", "fps", …} or {"modality": "audio", "sample_rate"}) and returns
`SCMVideoPipelineOutput` (`frames`, and `fps`) or `SCMAudioPipelineOutput` (`audios`, and `sample_rate`):

    clips = pipe(batch_size=4, num_inference_steps=2, seed=0)              # = `scm sample --n 4 --steps 2`
    clips.frames   # video: "pil" a list of N lists of T PIL frames; "np" float [N, T, H, W, C] in [0, 1];
                   #        "pt" float [N, T, C, H, W] in [0, 1]; "latent" [N, C, T, H, W] as sampled
    clips.audios   # audio: "np" float32 [N, C, L] in [-1, 1]; "pt" the same as a tensor; "latent" unclamped

diffusers (>= 0.33, for `SCMScheduler`) is needed to import this module: `pip install scm[diffusers]`.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from scm.errors import ConfigError, MissingDependency, SamplerError

try:
    from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SCMScheduler
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:
    raise MissingDependency(f"diffusers pipelines need diffusers >= 0.33, which is not installed ({e}): "
                            "pip install scm[diffusers]", extra="diffusers") from None

from scm.conditioning import Conditioning, guidance_as_input
from scm.config import from_dict
from scm.data.latents import decode
from scm.generate import image_generators
from scm.images import to_pil, to_uint8
from scm.nets.registry import build_net
from scm.sampling import T_MID, check_times, consistency_times
from scm.text import TextConfig, check_prompts
from scm.trigflow import t_max_default

__all__ = ["OUTPUT_TYPES", "SCMAudioPipelineOutput", "SCMModel", "SCMPipeline", "SCMTextEncoder",
           "SCMVideoPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MODALITIES = {3: "image", 4: "video", 2: "audio"}  # the dimensions of one sample (channels first) → its modality


@dataclass
class SCMVideoPipelineOutput(BaseOutput):
    """A video pipeline's clips (`frames`: see `SCMPipeline.__call__`'s output_type) and their frame rate."""

    frames: object
    fps: float


@dataclass
class SCMAudioPipelineOutput(BaseOutput):
    """An audio pipeline's clips (`audios`: [N, C, L] in [-1, 1]) and their sample rate in Hz."""

    audios: object
    sample_rate: int


def network_config(net_preset: str, net_config: dict, sigma_d: float = 0.5):
    """The scm network config recorded as (`net_preset`, its fields), read back the way a run's config.json is
    (`scm.config.from_dict`, for data of std `sigma_d`): the preset names the architecture in `scm.nets.registry`."""
    return from_dict({"net_preset": net_preset, "net": dict(net_config), "loss": {"sigma_d": sigma_d}}).net


class SCMModel(ModelMixin, ConfigMixin):
    """An scm network (any architecture of `scm.nets.registry`: U-Net, DiT, …) as a diffusers model.

    Config: `net_preset` and `net_config` (the network's config as a run's config.json stores it: the preset
    names the architecture, the fields are its config dataclass's) and `sigma_d`, the data's σ_d. Weights:
    `diffusion_pytorch_model.safetensors`. Called like every scm network, `model(x_t/σ_d, t, labels=None,
    guidance=None)` → F, the TrigFlow velocity prediction (dx_t/dt = σ_d·F, eq. 3), t in radians of shape [B];
    `labels` class indices [B] for class-conditional networks (`label_dim` > 0), `guidance` the guidance scale
    of a student distilled with classifier-free guidance as an input (`guidance_embed`, §5.2); a text network
    (`text_dim` > 0) also takes text [B, T, D], text_mask [B, T] (bool) and text_pooled [B, P] (`scm.nets.dit`)."""

    @register_to_config
    def __init__(self, net_preset: str, net_config: dict, sigma_d: float = 0.5):
        super().__init__()
        self.net = build_net(network_config(net_preset, net_config, sigma_d), sigma_d)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading, always building the network in memory: with accelerate installed diffusers would
        build it on the meta device and load only the saved weights, leaving the networks' non-persistent buffers
        (the frequencies of the time and guidance embeddings, computed at construction) without values."""
        kwargs["low_cpu_mem_usage"] = False
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def label_dim(self) -> int:
        """The number of classes (0: unconditional)."""
        return int(getattr(self.net.cfg, "label_dim", 0) or 0)

    @property
    def reads_no_class(self) -> bool:
        """Whether its network reads `scm.conditioning.NO_CLASS` as no class (guided class labels stack)."""
        return bool(getattr(self.net, "reads_no_class", False))

    @property
    def guidance_embed(self) -> bool:
        """Whether the network takes a guidance scale as an input."""
        return bool(getattr(self.net.cfg, "guidance_embed", False))

    @property
    def text_dim(self) -> int:
        """The width of the prompt's token embeddings (0: the network takes no prompt)."""
        return int(getattr(self.net.cfg, "text_dim", 0) or 0)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the network's input and output; (C, T, H, W) for video, (C, L) for audio."""
        return self.net.shape

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels=None, guidance=None, return_weight: bool = False,
                **text):
        text = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in text.items()}  # the network's dtype
        return self.net(x, t, labels, guidance=guidance, return_weight=return_weight, **text)


class SCMTextEncoder(ModelMixin, ConfigMixin):
    """A transformers text encoder's folder as a pipeline component (`text_encoder`): its files (the weights as
    safetensors, the config and tokenizer files) are copied as they are by `save_pretrained`, and `from_pretrained`
    remembers where the copy lies, so that the pipeline encodes prompts with it wherever it is loaded from. The
    encoder itself is loaded by `scm.text` from the run's record (`SCMPipeline.text_config`), which checks its
    weights against the recorded digest. Config (scm_text_encoder.json): `files`, the copied paths."""

    config_name = "scm_text_encoder.json"

    @register_to_config
    def __init__(self, files: list | None = None):
        super().__init__()
        self.folder: Path | None = None
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # a device for diffusers to read

    @classmethod
    def of_folder(cls, folder, files: list[str]) -> "SCMTextEncoder":
        """The component of the encoder in `folder`, whose `files` (relative paths) it copies when saved."""
        encoder = cls(files=sorted(files))
        encoder.folder = Path(folder)
        return encoder

    def save_pretrained(self, save_directory, **kwargs) -> None:
        out = Path(save_directory)
        for name in self.config.files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.folder / name, out / name)
        self.save_config(out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "SCMTextEncoder":
        folder = Path(pretrained_model_name_or_path)
        config = cls.load_config(folder)
        missing = [f for f in config.get("files", []) if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{folder}: the text encoder's {', '.join(missing)} is missing", key="text_encoder")
        return cls.of_folder(folder, list(config.get("files", [])))


class SCMPipeline(DiffusionPipeline):
    """Consistency sampling of an exported scm run (1, 2 or N steps, §5.1–5.3) with diffusers' `SCMScheduler`.

    Components: `model` (an `SCMModel`), `scheduler` (`SCMScheduler`, prediction_type "trigflow",
    sigma_data = σ_d), for a run on latents `vae` (an `AutoencoderKL`) and, for a text run with a transformers text
    encoder, `text_encoder` (`SCMTextEncoder`). Config (model_index.json): `text`, a text run's `TextConfig`; `t_max`
    and `t_mid`, the paper's sampling times (App. G.2, §5.2), used instead of the scheduler's defaults;
    `guidance_default`, the guidance scale used when none is given (a guided student's lowest training scale,
    as `scm sample`); `latent_mean`, `latent_std`, `latent_sigma_d`, the per-channel normalisation of a run on
    latents (App. G.1); `source`, where the weights came from (preset, method, step, EMA σ_rel)."""

    model_cpu_offload_seq = "model->vae"
    _optional_components: ClassVar[list[str]] = ["vae", "text_encoder"]

    def __init__(self, model: SCMModel, scheduler: SCMScheduler, vae: AutoencoderKL | None = None,
                 text_encoder: SCMTextEncoder | None = None, t_max: float | None = None, t_mid: float = T_MID,
                 guidance_default: float | None = None, latent_mean: list | None = None,
                 latent_std: list | None = None, latent_sigma_d: float | None = None, source: dict | None = None,
                 text: dict | None = None, media: dict | None = None):
        super().__init__()
        modality = MODALITIES.get(len(model.sample_shape))
        if modality != (media or {}).get("modality", "image"):
            raise ValueError(f"media {media!r} does not describe the model's samples {tuple(model.sample_shape)} "
                             f"({modality})")
        if (text is not None) != bool(model.text_dim):
            raise ValueError("a text network and its prompts' record (text) go together")
        if text is not None:
            TextConfig(**text).validate()
        self.register_modules(model=model, scheduler=scheduler, vae=vae, text_encoder=text_encoder)
        sigma_d = float(scheduler.config.sigma_data)
        t_max = t_max_default(sigma_d) if t_max is None else float(t_max)
        consistency_times(2, sigma_d=sigma_d, t_max=t_max, t_mid=float(t_mid))  # 0 < t_mid < t_max <= π/2
        if (vae is None) != (latent_mean is None):
            raise ValueError("a VAE and the latent normalisation (latent_mean, latent_std) go together")
        self.register_to_config(t_max=t_max, t_mid=float(t_mid), guidance_default=guidance_default,
                                latent_mean=latent_mean, latent_std=latent_std, latent_sigma_d=latent_sigma_d,
                                source=source, text=text, media=media)

    @property
    def sigma_d(self) -> float:
        return float(self.scheduler.config.sigma_data)

    @property
    def media(self) -> dict:
        """What the samples are, and their rate: {"modality": "image"}, video {"modality": "video", "fps", …},
        audio {"modality": "audio", "sample_rate"} (the exported run's RUN/media.json)."""
        return dict(getattr(self.config, "media", None) or {"modality": "image"})

    def times(self, num_inference_steps: int | None = None, timesteps=None) -> list[float]:
        """The times at which the network is evaluated (the trailing 0 not included): `timesteps` as given
        (decreasing, in (0, π/2]), or scm's defaults for `num_inference_steps` (1 step: [t_max]; 2 steps:
        [t_max, t_mid]; `scm.sampling.consistency_times`) with this pipeline's t_max and t_mid."""
        if timesteps is not None:
            try:
                ts = check_times(timesteps)
            except ValueError as e:
                raise SamplerError(f"timesteps: {e}", key="timesteps") from None
            if num_inference_steps is not None and num_inference_steps != len(ts):
                raise SamplerError(f"num_inference_steps={num_inference_steps}, but {len(ts)} timesteps were "
                                   "given", key="num_inference_steps")
            return ts
        steps = 1 if num_inference_steps is None else num_inference_steps
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise SamplerError(f"num_inference_steps={steps!r}: must be an integer >= 1", key="num_inference_steps")
        return consistency_times(steps, sigma_d=self.sigma_d, t_max=self.config.t_max, t_mid=self.config.t_mid)

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _generators(self, generator, seed, batch_size: int, device: torch.device):
        if seed is None and isinstance(generator, int) and not isinstance(generator, bool):
            generator, seed = None, generator
        if seed is not None:
            if generator is not None:
                raise SamplerError("give a seed or a generator, not both", key="seed")
            if not (isinstance(seed, int) and not isinstance(seed, bool)):
                raise SamplerError(f"seed={seed!r}: must be an integer", key="seed")
            return image_generators(seed, 0, batch_size, device)
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
                raise SamplerError(f"generator: {len(generator)} generators for a batch of {batch_size} (one "
                                   "torch.Generator per image)", key="generator")
            return list(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise SamplerError(f"generator={generator!r}: a torch.Generator, a list of them (one per image) or a "
                               "seed", key="generator")
        return generator

    @property
    def text_config(self) -> TextConfig | None:
        """A text pipeline's prompts (`scm.text.TextConfig`, from the config's `text`), its transformers encoder
        read from this pipeline's own copy (the `text_encoder` component; a diffusers pipeline's text components for
        a run encoded with them); None for a pipeline without prompts."""
        if self.config.text is None:
            return None
        text = TextConfig(**{**self.config.text, "encoder": dict(self.config.text["encoder"])})
        if text.encoder.get("kind") in ("transformers", "pipeline"):
            folder = getattr(self.text_encoder, "folder", None)
            if folder is None:
                raise SamplerError("prompt: this pipeline's text encoder (its text_encoder component) is missing",
                                   key="prompt")
            text.encoder["path"] = str(Path(folder).resolve())
        return text

    @property
    def conditioning(self) -> Conditioning:
        """What the exported run is conditioned on (`scm.conditioning.Conditioning`): the model's classes, its prompts,
        its guidance input and the scale used when none is given (`guidance_default`)."""
        text = self.text_config
        if not self.model.guidance_embed:
            return Conditioning(self.model.label_dim, text=text)
        default = self.config.guidance_default
        return Conditioning(self.model.label_dim, "input", 1.0 if default is None else float(default), text)

    def _prompts(self, prompt, num_images_per_prompt, batch_size):
        """(prompts, batch size): the prompt of each of the first len(prompts) images (image i takes prompt i mod
        their number), each repeated `num_images_per_prompt` times; the batch size defaults to their number."""
        if num_images_per_prompt is not None:
            k = num_images_per_prompt
            if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
                raise SamplerError(f"num_images_per_prompt={k!r}: must be an integer >= 1", key="num_images_per_prompt")
            if prompt is None:
                raise SamplerError("num_images_per_prompt: give a prompt (or batch_size for a model without prompts)",
                                   key="num_images_per_prompt")
        if prompt is None:
            return None, 1 if batch_size is None else batch_size
        if self.config.text is None:
            raise SamplerError(f"prompt={_bounded(prompt)}: this model takes no prompt"
                               + (" (it takes class labels)" if self.model.label_dim else ""), key="prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and len(prompt) > 0)):
            raise SamplerError(f"prompt={_bounded(prompt)}: a str, or a list of them (one per image)", key="prompt")
        try:
            prompts = check_prompts(prompt)
        except ConfigError as e:
            raise SamplerError(str(e), key="prompt") from None
        prompts = [p for p in prompts for _ in range(num_images_per_prompt or 1)]
        if batch_size is None:
            return prompts, len(prompts)
        if num_images_per_prompt is not None and batch_size != len(prompts):
            raise SamplerError(f"batch_size={batch_size!r}: {len(prompts)} images asked by the prompts and "
                               "num_images_per_prompt", key="batch_size")
        return prompts, batch_size

    def _conditioning(self, batch_size: int, class_labels, guidance_scale, device: torch.device,
                      prompts: list[str] | None = None) -> dict:
        """The network's inputs besides (x, t), checked: class labels (an int, one per image, or None: image i gets
        class i mod the number of classes, as `scm sample`), the prompts' embeddings (image i: prompt i mod their
        number) and the guidance scale (default: `guidance_default`)."""
        labels = None
        if class_labels is not None:
            labels = [class_labels] * batch_size if isinstance(class_labels, int) else class_labels
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError):
                labels = None
            if labels is None or labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim != 1:
                raise SamplerError(f"class_labels={class_labels!r}: class indices, an int or one per image",
                                   key="class_labels")
            if labels.shape[0] != batch_size:
                raise SamplerError(f"class_labels: {labels.shape[0]} labels for a batch of {batch_size}",
                                   key="class_labels")
            labels = labels.tolist()
        conditioning = self.conditioning
        why = conditioning.refusal(labels, guidance_scale, prompts)
        if why is not None:  # in this pipeline's own words: class_labels, guidance_scale, prompt
            key = {"class_label": "class_labels", "guidance": "guidance_scale", "prompt": "prompt"}[why[0]]
            value = {"class_labels": class_labels, "guidance_scale": guidance_scale}.get(key)
            raise SamplerError(f"{key}={_bounded(value)}: {why[1]}", key=key)
        per_image = None if prompts is None else [prompts[i % len(prompts)] for i in range(batch_size)]
        return conditioning.sample_inputs(torch.arange(batch_size, device=device), labels, guidance_scale, per_image)

    # -- decoding -------------------------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Samples in the model's space → images in [-1, 1]: for a run on latents the inverse of its per-channel
        normalisation, then the VAE's decoder, exactly as `scm sample` decodes (`scm.data.latents.decode`, App.
        G.1); pixels are returned as they are."""
        if self.vae is None:
            return x0
        sd = self.config.latent_sigma_d if self.config.latent_sigma_d is not None else self.sigma_d
        info = {"mean": self.config.latent_mean, "std": self.config.latent_std, "sigma_d": sd, "vae": "(pipeline)"}
        return decode(x0, info, self.vae, batch=batch)

    # -- sampling -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, batch_size: int | None = None,
                 num_inference_steps: int | None = None, generator=None, class_labels=None,
                 guidance_scale: float | None = None, timesteps=None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, seed: int | None = None,
                 num_images_per_prompt: int | None = None):
        """Generate images with `num_inference_steps` consistency steps (default 1).

        Args:
            prompt: text models: a str for all images, or a list of which image i takes prompt i mod its length
                ("" for the unconditional; required, as `scm sample` requires one). An int here is read as
                `batch_size` (this argument's place before prompts existed).
            batch_size: the number of images (default: the number of prompts × `num_images_per_prompt`, 1
                without prompts; taken from `latents` when given).
            num_inference_steps: 1 (t_max), 2 (t_max, t_mid) or more (scm's schedule); see `times`.
            generator: a torch.Generator, a list of one per image (scm's convention: image i's noise from its own
                generator, `scm.generate.image_generators`), a seed (an int, as `seed`) or None (global RNG).
            class_labels: class-conditional models: an int, or one class index per image (default: image i gets
                class i mod the number of classes, as `scm sample`).
            guidance_scale: students distilled with classifier-free guidance (a guidance input, §5.2): the scale
                (default: the config's `guidance_default`).
            timesteps: explicit decreasing times in (0, π/2] (radians; a trailing 0 may be given), like
                `scm sample --ts`.
            latents: the initial noise x_{t_0} (std σ_d, shape [B, C, H, W]) instead of drawing it.
            output_type: "pil" (PIL images, quantised as `scm sample` writes its PNGs), "np" (float [B, H, W, C]
                in [0, 1]), "pt" (float [B, C, H, W] in [0, 1]) or "latent" (the samples in the model's space:
                images in [-1, 1] unclamped, or normalised latents, not decoded); video and audio: the module
                docstring (audio has no "pil").
            seed: per-image generators seeded with (seed, image index): exactly `scm sample --seed`.
            num_images_per_prompt: images of each prompt, one prompt's images together (as `scm sample
                --n-per-prompt`).
        """
        if isinstance(prompt, int) and not isinstance(prompt, bool) and batch_size is None:
            prompt, batch_size = None, prompt
        if output_type not in OUTPUT_TYPES:
            raise SamplerError(f"output_type={output_type!r}: use one of {', '.join(OUTPUT_TYPES)}", key="output_type")
        device, shape = self._execution_device, self.model.sample_shape
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape[1:]) != shape \
                    or latents.ndim != len(shape) + 1:
                raise SamplerError(f"latents: expected a tensor of shape [B, {', '.join(map(str, shape))}], got "
                                   f"{tuple(getattr(latents, 'shape', ()))}", key="latents")
            batch_size = latents.shape[0]
        prompts, batch_size = self._prompts(prompt, num_images_per_prompt, batch_size)
        if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
            raise SamplerError(f"batch_size={batch_size!r}: must be an integer >= 1", key="batch_size")
        ts = self.times(num_inference_steps, timesteps)
        gens = self._generators(generator, seed, batch_size, device)
        # (the scale as a tensor: a compiled `pipe.model` takes each scale as an input, not as a graph of its own)
        cond = guidance_as_input(self._conditioning(batch_size, class_labels, guidance_scale, device, prompts),
                                 batch_size, device)
        # the initial noise σ_d·ε at t_0, drawn as scm.generate draws it (float32, per-image generators)
        if latents is None:
            x = self.sigma_d * randn_tensor((batch_size, *shape), generator=gens, device=device, dtype=torch.float32)
        else:
            x = latents.to(device=device, dtype=torch.float32)
        media = self.media
        if media["modality"] == "audio" and output_type == "pil":
            raise SamplerError("output_type='pil': audio has no PIL form; use np, pt or latent", key="output_type")
        images = self._output(self._sample(x, ts, gens, cond), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        if media["modality"] == "video":
            return SCMVideoPipelineOutput(frames=images, fps=media["fps"])
        if media["modality"] == "audio":
            return SCMAudioPipelineOutput(audios=images, sample_rate=media["sample_rate"])
        return ImagePipelineOutput(images=images)

    def _sample(self, x: torch.Tensor, ts: list[float], gens, cond: dict) -> torch.Tensor:
        """Consistency sampling from the noise `x` at ts[0] through `ts`: the x0 estimate of the last step."""
        model, sd, batch_size = self.model, self.sigma_d, x.shape[0]
        # the paper's schedule, not the scheduler's defaults: explicit times ending at 0
        self.scheduler.set_timesteps(len(ts), timesteps=[*ts, 0.0], device=x.device, max_timesteps=None,
                                     intermediate_timesteps=None)
        self.scheduler.set_begin_index(0)
        x0 = x
        for t in self.progress_bar(self.scheduler.timesteps[:-1]):
            tb = t.reshape(1).repeat(batch_size)
            out = model((x / sd).to(model.dtype), tb, **cond)
            F = (out[0] if isinstance(out, (tuple, list)) else out).float()
            # SCMScheduler's "trigflow" step: x0 = cos t·x_t − sin t·(σ_d·F) (eq. 5), then x = cos t'·x0 + sin t'·σ_d·ε
            # at the next time t' (§5.3; at t' = 0, x = x0)
            step = self.scheduler.step(sd * F, t, x, generator=gens)
            x, x0 = step.prev_sample, step.pred_original_sample
        return x0

    def _output(self, x0: torch.Tensor, output_type: str):
        """The samples as `output_type` asks (see `__call__`; video and audio: the module docstring)."""
        if output_type == "latent":
            return x0
        modality = self.media["modality"]
        if modality == "audio":
            audio = x0.clamp(-1, 1)
            return audio.cpu().numpy() if output_type == "np" else audio
        if modality == "video":
            frames = x0.transpose(1, 2)  # [N, T, C, H, W]
            if output_type == "pil":
                return [[to_pil(a) for a in to_uint8(clip)] for clip in frames]
            frames = (frames * 0.5 + 0.5).clamp(0, 1)
            return frames.permute(0, 1, 3, 4, 2).cpu().numpy() if output_type == "np" else frames
        pixels = self.decode(x0)
        if output_type == "pil":
            return [to_pil(a) for a in to_uint8(pixels)]
        images = (pixels * 0.5 + 0.5).clamp(0, 1)
        return images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images


def _bounded(value, limit: int = 64) -> str:
    """repr(value), cut to `limit` characters (a prompt may be long)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"
