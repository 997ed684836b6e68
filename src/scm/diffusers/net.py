"""A diffusers network as an sCM student: the teacher's own architecture and weights, trained by sCD or sCT.

Distillation starts the student from its teacher (Lu & Song 2024, App. G.2; Sana-Sprint, Chen et al. 2025, does the
same with a diffusers transformer). `student_from_diffusers(model, scheduler, sigma_d=…)` copies the teacher's weights
into a `DiffusersNet`, a network scm trains like its own (`scm.nets.unet.UNet`, `scm.nets.dit.DiT`):

    net(x_t/σ_d, t, labels=None, guidance=None, return_weight=False, **cond) -> F, or (F, w_φ(t))

* TrigFlow in and out (§3, App. B): the diffusers model sees its own input and timestep for TrigFlow's
  x_t = σ_d·x_scaled at time t, and its prediction becomes TrigFlow's F, by the exact algebra of
  `scm.diffusers.convert` (`Parameterization.model_inputs` / `trigflow_F`; VP ε/v/x0, EDM and rectified-flow
  models; data convention "own" or "unit"). A fresh student therefore computes exactly its teacher's F.
* The adaptive weight w_φ(t) of eq. 8: a head of t alone, as in scm's U-Net (a positional embedding of
  c_noise(t) = t, §4.1, then one magnitude-preserving linear layer to a scalar).
* The guidance embedding (§5.2; Sana-Sprint's distilled-CFG input): a positional embedding of the guidance scale s
  and a linear layer, zero-initialised, added to the diffusers model's time embedding: for UNet2DModel and
  UNet2DConditionModel the output of `time_embedding` (before the class embedding is added and the blocks read it),
  for DiTTransformer2DModel the output of every block's `norm1.emb` (the timestep + label embedding that feeds that
  block's AdaLayerNormZero; block 0's also feeds the final layer). It is added by forward hooks on those modules, so
  the diffusers model's code and state-dict keys stay as they are. Zero-initialised, it leaves a fresh student equal
  to its teacher at every s.
* Label dropout for classifier-free guidance: labels replaced by the model's "no class" index with probability
  `label_dropout` in training, drawn with torch.rand from the global RNG (a replayed pass drops the same rows, as
  in `scm.nets.layers.class_labels`). diffusers' own label dropout (DiT's LabelEmbedding) is switched off, so the
  configuration alone decides. Prompt embeddings (UNet2DConditionModel's encoder_hidden_states) pass through as
  keyword conditioning and are never dropped here.
* The JVP (§5.1) goes through the network: `scm.diffusers.jvp.enable_jvp` swaps diffusers' attention processors
  for scm's exact-JVP attention and fixes GroupNorm and the timestep embedding for forward-mode AD.

A run stores `DiffusersNetConfig` (the diffusers class name and config, the scheduler's class name and config, the
conventions, the heads' sizes) in its config.json, and the weights in its checkpoints: `scm.nets.registry.build_net`
rebuilds the network without the original diffusers folder. diffusers itself must be installed
(`pip install 'scm[diffusers]'`).
"""

from __future__ import annotations

import contextlib
import json

import torch
from torch import nn

from scm._checks import describe_shape
from scm.diffusers.convert import Parameterization, call_model, data_scale, default_null_label, num_classes
from scm.diffusers.families import family_of, latent_shape
from scm.diffusers.net_config import SUPPORTED_MODELS, DiffusersNetConfig
from scm.errors import ConfigError
from scm.lora_config import LoRAConfig
from scm.nets.layers import Linear, MPConv, Network, PositionalEmbedding, check_input, guidance_scales
from scm.precision import compute_dtype

__all__ = ["SUPPORTED_MODELS", "DiffusersNet", "DiffusersNetConfig", "copy_teacher_weights", "student_config",
           "student_from_diffusers"]


def _diffusers():
    from scm.diffusers.teacher import diffusers_module  # MissingDependency (extra "latent") without diffusers

    return diffusers_module()


def _plain(config) -> dict:
    """A diffusers config as plain JSON values (what config.json holds; tuples become lists), without its private
    "_…" entries."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _build_model(cfg: DiffusersNetConfig) -> nn.Module:
    diffusers = _diffusers()
    if not cfg.model_class:
        raise ConfigError("a diffusers student needs its model: DiffusersNetConfig.model_class is empty (make the "
                          "student from its teacher with student_from_diffusers)", key="net.model_class")
    cls = getattr(diffusers, cfg.model_class, None)
    if cls is None:
        raise ConfigError(f"class {cfg.model_class} is not in diffusers {diffusers.__version__}",
                          key="net.model_class")
    return cls.from_config(cfg.model_config)


def _parameterization(cfg: DiffusersNetConfig) -> Parameterization:
    diffusers = _diffusers()
    cls = getattr(diffusers, cfg.scheduler_class, None) if cfg.scheduler_class else None
    if cls is None:
        raise ConfigError(f"scheduler class {cfg.scheduler_class!r} is not in diffusers {diffusers.__version__}",
                          key="net.scheduler_class")
    return Parameterization.from_scheduler(cls.from_config(cfg.scheduler_config))


def _width(module: nn.Module) -> int:
    """The output width of a time-embedding module (its last linear layer)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


class DiffusersNet(Network):
    """A diffusers network mapping (x_t/σ_d, t, labels, guidance, **cond) to TrigFlow's F, plus w_φ(t) on request
    (module docstring), for data of std σ_d (the run's). `model` (optional) is the diffusers network to wrap,
    already holding the weights; without it one is built from `cfg.model_config` (random weights, to be loaded from
    a checkpoint or from the teacher)."""

    def __init__(self, cfg: DiffusersNetConfig, sigma_d: float, model: nn.Module | None = None):
        super().__init__(cfg, sigma_d)
        from scm.diffusers.jvp import enable_jvp

        model = _build_model(cfg) if model is None else model
        name = type(model).__name__
        _check_supported(name, "net.model_class")
        if name != cfg.model_class:
            raise ConfigError(f"the model is a {name}, its config names {cfg.model_class}", key="net.model_class")
        self.param = _parameterization(cfg)
        self.k = data_scale(cfg.data, self.sigma_d)
        _check_model(dict(model.config), cfg)
        self.null_label = _null_label(cfg, model)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = float(cfg.dropout)
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0  # diffusers' label dropout off: `label_dropout` decides (module docstring)
        self.model = enable_jvp(model)
        if cfg.checkpointing:  # diffusers' own per-block checkpointing (non-reentrant; see Network.block)
            self.model.enable_gradient_checkpointing()
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device

        # The adaptive-weight head w_φ(t) (eq. 8), as in scm.nets.unet.
        self.weight_embed = PositionalEmbedding(cfg.weight_channels)
        self.weight_linear = MPConv(cfg.weight_channels, 1)
        # The guidance embedding (§5.2, Sana-Sprint): zero-initialised, added to the time embedding by hooks.
        self.guidance_embed = self.guidance_linear = None
        self._guidance: torch.Tensor | None = None
        self.family = family_of(model)
        if cfg.guidance_embed and not self.family.own_guidance(model.config):
            targets = self.family.time_embeddings(model)
            self.guidance_embed = PositionalEmbedding(cfg.embed_channels)
            self.guidance_linear = Linear(cfg.embed_channels, _width(targets[0]))
            nn.init.zeros_(self.guidance_linear.weight)
            nn.init.zeros_(self.guidance_linear.bias)
            for module in targets:
                module.register_forward_hook(self._add_guidance)
        for m in (self.weight_embed, self.weight_linear, self.guidance_embed, self.guidance_linear):
            if m is not None:
                m.to(device=device, dtype=dtype if dtype == torch.float64 else None)
        self.base_new_keys: tuple[str, ...] | None = None  # the model's keys its teacher lacks (copy_teacher_weights)
        self._base_only = False
        self.adapted: list[str] = []
        if cfg.lora.rank:
            self._add_adapters()

    # -- LoRA (scm.diffusers.lora) -----------------------------------------------------------------------------------
    def _add_adapters(self) -> None:
        """peft adapters on the model (every weight of it frozen), and hooks that silence a guidance embedder its
        teacher lacks while the network is its own teacher (`base_only`)."""
        from scm.diffusers.lora import add_adapters

        self.adapted = add_adapters(self.model, self.cfg.lora)  # the names of the adapted layers
        for name, module in self.model.named_modules():
            if name.endswith("guidance_embedder"):
                module.register_forward_hook(lambda m, args, out, name=name: self._silenced(name, out))

    def _silenced(self, name: str, output):
        new = self._base_only and any(k.startswith(name + ".") for k in self.base_new_keys or ())
        return torch.zeros_like(output) if new else output

    @contextlib.contextmanager
    def base_only(self):
        """The network as its LoRA student's teacher: adapters and the student's own guidance input off, eval mode
        (`scm.diffusers.lora.BaseTeacher`)."""
        from scm.diffusers.lora import switched_off

        if not self.cfg.lora.rank:
            raise RuntimeError("base_only: this network has no adapters (lora.rank is 0)")
        self._base_only = True
        try:
            with switched_off(self, self.model):
                yield self
        finally:
            self._base_only = False

    def load_base(self) -> DiffusersNet:
        """A LoRA student's frozen base: the weights of the teacher folder its config names (`lora_base`), read
        again (checkpoints hold the trained tensors only)."""
        from scm.teachers import open_teacher

        if not self.cfg.lora_base:
            raise ConfigError("a LoRA student needs its base: DiffusersNetConfig.lora_base is empty",
                              key="net.lora_base")
        source = open_teacher(self.cfg.lora_base)
        loaded = source.folder.load(device=next(self.parameters()).device)
        return copy_teacher_weights(self, loaded.model)

    def trained_keys(self) -> list[str] | None:
        """The state-dict entries training changes, which checkpoints and EMA averages hold: all (None) for a
        network trained whole; for a LoRA student its adapters, its heads and what its teacher lacks."""
        if not self.cfg.lora.rank:
            return None
        if self.base_new_keys is None:  # what copy_teacher_weights finds, from the teacher's config alone
            from scm.teachers import open_teacher

            own = self.family.own_guidance(open_teacher(self.cfg.lora_base).folder.model_config)
            self.base_new_keys = () if own else tuple(k for k in self.model.state_dict() if ".guidance_embedder." in k)
        new = {"model." + k for k in self.base_new_keys}
        return [k for k in self.state_dict() if not k.startswith("model.") or ".lora_" in k or k in new]

    def _add_guidance(self, module, args, output):
        return output if self._guidance is None else output + self._guidance.to(output.dtype)

    # -- conditioning ---------------------------------------------------------------------------------------------
    @property
    def reads_no_class(self) -> bool:
        """An index outside the classes is the model's unconditional class, where it has one (`_labels`)."""
        return self.null_label is not None

    def _labels(self, labels, batch: int, device) -> torch.Tensor | None:
        """scm's labels (class indices [B], or one-hot rows [B, label_dim] where a zero row is "no class") as the
        model's class indices; with a null class, indices outside [0, label_dim) and zero rows become it, and in
        training each row is dropped to it with probability label_dropout."""
        n, null = self.cfg.label_dim, self.null_label
        if labels is None:
            return None
        if n == 0:
            raise ValueError("this network is unconditional (label_dim=0) but labels were given")
        if labels.is_floating_point():
            if tuple(labels.shape) != (batch, n):
                raise ValueError(f"labels must be class indices of shape [{batch}] or a [{batch}, {n}] array")
            index = labels.argmax(dim=1)
            if null is not None:
                index = torch.where(labels.abs().sum(dim=1) > 0, index, null)
        else:
            if tuple(labels.shape) != (batch,):
                raise ValueError(f"labels must be class indices of shape [{batch}] or a [{batch}, {n}] array")
            index = labels.long()
            if null is not None:
                index = torch.where((index >= 0) & (index < n), index, null)
        if self.training and self.cfg.label_dropout:
            drop = torch.rand(batch, device=device) < self.cfg.label_dropout
            index = torch.where(drop, null, index)
        return index

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, x, t, labels=None, guidance=None, return_weight: bool = False, **cond):
        check_input("DiffusersNet", x, t, self.shape)
        self.checkpointing()  # the fused pass is refused by name (the model checkpoints its own blocks)
        sd, k = self.sigma_d, self.k
        x_in, timestep = self.param.model_inputs(x, t, sd, k)
        index = self._labels(labels, x.shape[0], x.device)
        own = self.family.own_guidance(self.model.config)
        if (self.guidance_linear is not None and not self._base_only) or own:
            with torch.autocast(x.device.type, enabled=False):
                g = guidance_scales(guidance, x.shape[0], x.device, compute_dtype(t))
            if own:
                cond["guidance"] = g
            else:
                self._guidance = self.guidance_linear(self.guidance_embed(g))
        try:
            out = call_model(self.model, x_in, timestep, labels=index, null_label=self.null_label, **cond)
        finally:
            self._guidance = None
        F = self.param.trigflow_F(out, x_in, t, sd, k).to(x.dtype)
        return (F, self.weight(t)) if return_weight else F


def _null_label(cfg: DiffusersNetConfig, model: nn.Module) -> int | None:
    """The model's "no class" index (`null_label`, or the model's own): needed for label dropout."""
    null = cfg.null_label if cfg.null_label is not None else default_null_label(model)
    if cfg.label_dropout and null is None:
        raise ConfigError(f"label_dropout={cfg.label_dropout}: {cfg.model_class} has no 'no class' index (set "
                          "null_label)", key="net.label_dropout")
    return null


def _check_supported(name: str, key: str) -> None:
    if name not in SUPPORTED_MODELS:
        raise ConfigError(f"{name} is not a network scm can train as a student (supported: "
                          f"{', '.join(SUPPORTED_MODELS)})", key=key)


def _model_shape(config, name: str, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """(C, H, W) of a diffusers model's input: `shape` (checked), or from its config (sample_size: R, or [H, W])."""
    found = latent_shape(config, name, shape)
    if found is None:
        raise ConfigError(f"{name}: its config gives no input size (sample_size): the data's shape is needed",
                          key="teacher")
    return found


def _resolution(shape: tuple[int, ...]) -> int | tuple[int, ...]:
    """How a config records the sizes of `shape` (C, H, W): R when square, else (H, W)."""
    return shape[1] if shape[1] == shape[2] else tuple(shape[1:])


def _check_model(config, cfg: DiffusersNetConfig) -> None:
    """A model config (a mapping) scm can train as the student `cfg` describes: a time embedding with a derivative,
    the shape, the prompt widths and no more classes than the model has."""
    name = cfg.model_class
    if config.get("time_embedding_type") == "learned":
        raise ConfigError(f"{name} has a learned (table) time embedding, which has no derivative in t: it cannot be "
                          "trained as an sCM student", key="net.model_class")
    _model_shape(config, name, cfg.img_shape)  # channels (and Flux's even sizes)
    shape = latent_shape(config, name)
    if shape is not None and cfg.img_shape != shape and not family_of(name).any_size:
        raise ConfigError(f"DiffusersNetConfig is for {describe_shape(cfg.img_shape)} inputs but the {name} takes "
                          f"{describe_shape(shape)}", key="net")
    if (cfg.text_dim, cfg.text_pooled_dim) != family_of(name).widths(config):
        raise ConfigError(f"DiffusersNetConfig takes prompts of widths {(cfg.text_dim, cfg.text_pooled_dim)}, the "
                          f"{name} {family_of(name).widths(config)}", key="net.text_dim")
    classes = num_classes(config) or 0
    if cfg.label_dim > classes:
        raise ConfigError(f"label_dim={cfg.label_dim}, but the {name} has {classes or 'no'} classes",
                          key="net.label_dim")


def student_config(model_class: str, model_config: dict, scheduler_class: str, scheduler_config: dict, *,
                   data: str = "own", label_dim: int | None = None, guidance_embed: bool = False,
                   label_dropout: float = 0.0, null_label: int | None = None, dropout: float | None = None,
                   weight_channels: int = 128, embed_channels: int = 256,
                   shape: tuple[int, ...] | None = None, checkpointing: bool = False, lora: LoRAConfig | None = None,
                   lora_base: str = "") -> DiffusersNetConfig:
    """The config of the student a diffusers model (its class and config, and its training scheduler's) gives, from
    the configs alone (no weights are read, no random numbers drawn): `student_from_diffusers` without the model.
    label_dim (the classes of scm's labels) defaults to the model's; fewer are allowed (labels 0 … label_dim−1 are
    the model's first classes; 0 with a class-conditional model: always its "no class" input); dropout defaults to
    the model's configured dropout; shape (C, H, W) to the model's sample_size (a transformer takes other sizes; Flux
    has none of its own); lora: adapters (`scm.diffusers.lora`) on the base weights of the folder `lora_base`. With
    guidance_embed, a class with a guidance embedder of its own (Flux, Sana) has it
    switched on (`scm.diffusers.families`); a model that already takes a guidance scale (Flux-dev) always does.
    ConfigError for a model scm cannot train as a student (module docstring); what only its modules tell (a "no
    class" index for label dropout) is read from the model built on the meta device (no memory, no weights)."""
    _check_supported(model_class, "teacher")
    model_config, scheduler_config = _plain(model_config), _plain(scheduler_config)
    family = family_of(model_class)
    guidance_embed = guidance_embed or family.own_guidance(model_config)
    if guidance_embed and family.time_embeddings is None:
        model_config.update(family.native_guidance)
    shape, classes = _model_shape(model_config, model_class, shape), num_classes(model_config) or 0
    if label_dim is not None and not 0 <= label_dim <= classes:
        raise ConfigError(f"label_dim={label_dim}, but the {model_class} has {classes or 'no'} classes",
                          key="label_dim")
    text_dim, pooled_dim = family.widths(model_config)
    cfg = DiffusersNetConfig(
        model_class=model_class, model_config=model_config, scheduler_class=scheduler_class,
        scheduler_config=scheduler_config, data=data, img_resolution=_resolution(shape), img_channels=shape[0],
        label_dim=classes if label_dim is None else label_dim, null_label=null_label, guidance_embed=guidance_embed,
        text_dim=text_dim, text_pooled_dim=pooled_dim, label_dropout=label_dropout, checkpointing=checkpointing,
        embed_channels=embed_channels, weight_channels=weight_channels, lora=lora or LoRAConfig(), lora_base=lora_base,
        dropout=float(model_config.get("dropout", 0.0) if dropout is None else dropout))
    _check_model(model_config, cfg)
    if cfg.label_dropout:
        with torch.device("meta"):
            _null_label(cfg, _build_model(cfg))
    return cfg


def student_from_diffusers(model: nn.Module, scheduler, *, sigma_d: float | None, data: str = "own",
                           **settings) -> DiffusersNet:
    """An sCM student initialised from a diffusers teacher (module docstring): a `DiffusersNet` holding a copy of
    `model`'s weights (the teacher is not modified), with the TrigFlow parameterisation read from `scheduler`, a
    fresh w_φ head and, with `guidance_embed`, a zero-initialised guidance embedding, so that it computes exactly
    the teacher's F. Its parameters are float32 (float64 for a float64 teacher) on the teacher's device, with
    gradients, in training mode. `settings`: those of `student_config` (label_dim, guidance_embed, label_dropout,
    null_label, dropout, weight_channels, embed_channels, shape, checkpointing).

    sigma_d and data are the teacher conventions of `scm.diffusers.from_diffusers` (σ_d may be None for an EDM
    teacher with data="own"). Supported: the classes of `scm.diffusers.families` (UNet2DModel, UNet2DConditionModel
    with SD's and SDXL's conditioning, DiTTransformer2DModel, PixArt, SD3, Flux and Sana transformers); any other
    class is a ConfigError."""
    from scm.diffusers.teacher import resolve_sigma_d

    _check_supported(type(model).__name__, "teacher")
    cfg = student_config(type(model).__name__, dict(model.config), type(scheduler).__name__, dict(scheduler.config),
                         data=data, **settings)
    net = DiffusersNet(cfg, resolve_sigma_d(Parameterization.from_scheduler(scheduler), sigma_d, data))
    copy_teacher_weights(net, model)
    return net.train()


def copy_teacher_weights(student: DiffusersNet, model: nn.Module) -> DiffusersNet:
    """Load a diffusers teacher's weights into its student's copy of the network (float64 for a float64 teacher), on
    the teacher's device. A guidance embedder the student has and its teacher has not (Flux, Sana:
    `scm.diffusers.families`) keeps its fresh weights with its output layer zeroed, so it adds nothing."""
    teacher_param = next(model.parameters())
    student.to(teacher_param.device)
    if teacher_param.dtype == torch.float64:
        student.double()
    family = student.family
    switched_on = family.own_guidance(student.model.config) and not family.own_guidance(model.config)
    rename = family.rename if switched_on and family.rename else (lambda key: key)
    adapted = {k.replace(".base_layer.", "."): k for k in student.model.state_dict() if ".base_layer." in k}
    state = {adapted.get(rename(k), rename(k)): v for k, v in model.state_dict().items()}
    missing, unexpected = student.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k]  # a LoRA student's adapters (scm.diffusers.lora)
    new = [k for k in missing if ".guidance_embedder." in k]
    if unexpected or len(new) != len(missing):
        raise ConfigError(f"the teacher's weights do not fit its student ({type(model).__name__}): missing "
                          f"{sorted(set(missing) - set(new))[:4]}, unexpected {sorted(unexpected)[:4]}", key="teacher")
    for name, module in student.model.named_modules():
        if new and name.endswith("guidance_embedder.linear_2"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    student.base_new_keys = tuple(new)
    if student.cfg.lora.rank:  # what the teacher lacks trains in full beside the adapters
        for name, p in student.model.named_parameters():
            p.requires_grad_(".lora_" in name or name in new)
    return student
