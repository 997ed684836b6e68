"""diffusers models as TrigFlow teachers: `from_diffusers` wraps a model and its scheduler, `load_diffusers` reads
both from a local folder (safetensors only). The algebra is in `scm.diffusers.convert`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from scm._checks import check_positive, check_t
from scm.diffusers.convert import Parameterization, call_model, data_scale, default_null_label, num_classes
from scm.errors import ConfigError, require_modules
from scm.integrity import check_finite, read_header

__all__ = ["DENOISER_COMPONENTS", "DiffusersFolder", "DiffusersModel", "from_diffusers", "load_diffusers",
           "read_diffusers", "resolve_sigma_d"]

DENOISER_COMPONENTS = ("unet", "transformer", "prior", "decoder")  # a pipeline's network, in model_index.json


def diffusers_module():
    return require_modules("diffusers models", "diffusers", "diffusers")[0]


def resolve_sigma_d(param: Parameterization, sigma_d: float | None, data: str) -> float:
    """σ_d: given, or for an EDM model with data="own" its scheduler's sigma_data (the std the teacher assumed);
    otherwise it must be given (the std of the teacher's data, e.g. measured with `scm data info`)."""
    if sigma_d is not None:
        check_positive("sigma_d", sigma_d)
        return float(sigma_d)
    if param.kind == "edm" and data == "own":
        return float(param.sigma_data)
    raise ConfigError("sigma_d: the std of the teacher's data is needed for a VP or flow-matching teacher "
                      "(EDM schedulers record it as sigma_data)", key="sigma_d")


def from_diffusers(model: torch.nn.Module, scheduler, *, sigma_d: float | None = None, data: str = "own",
                   null_label: int | None = None, **cond):
    """A diffusers network and its training scheduler as a TrigFlow teacher fn(x_t/σ_d, t, **cond) -> F.

    The parameterisation (VP/DDPM ε/v/x0, EDM, rectified flow) is read from the scheduler; the exact conversion
    and the data convention are documented in `scm.diffusers.convert`: by default (data="own") scm's x0 is the
    teacher's own data and σ_d its std; data="unit" is Sana-Sprint's (the teacher's data is x0/σ_d). `cond`
    holds keyword inputs passed at every call (e.g. encoder_hidden_states); per-call conditioning (labels=…,
    other tensors) comes with each call, and `scm.conditioning.guided(fn, uncond)` adds classifier-free guidance
    (labels=None, or scm's NO_CLASS index, is the model's unconditional class where it has one, or `null_label`).
    The wrapper computes in the model's dtype and device; it does not read t's values (0 < t < π/2 for ε-, x0- and
    EDM models).
    """
    if null_label is None and num_classes(model) is not None:
        null_label = default_null_label(model)
    param = Parameterization.from_scheduler(scheduler)
    sigma_d = resolve_sigma_d(param, sigma_d, data)
    k = data_scale(data, sigma_d)
    fixed = dict(cond)

    def fn(x_scaled: torch.Tensor, t: torch.Tensor, **call_cond) -> torch.Tensor:
        check_t(t, x_scaled)
        x_in, timestep = param.model_inputs(x_scaled, t, sigma_d, k)
        out = call_model(model, x_in, timestep, null_label=null_label, **{**fixed, **call_cond})
        return param.trigflow_F(out, x_in, t, sigma_d, k).to(x_scaled.dtype)

    from scm.diffusers.families import family_of

    fn.parameterization, fn.sigma_d, fn.data = param, sigma_d, data
    fn.takes_guidance = family_of(model, generic=True).own_guidance(getattr(model, "config", {}))
    # negative class indices are the unconditional class where the model has one (`call_model`)
    fn.reads_no_class = null_label is not None  # NO_CLASS rows stack in a guided call (`scm.conditioning`)
    return fn


@dataclass
class DiffusersModel:
    """A diffusers network and its scheduler, read from `path`."""

    path: str
    model: torch.nn.Module
    scheduler: object

    @property
    def parameterization(self) -> Parameterization:
        return Parameterization.from_scheduler(self.scheduler)


@dataclass(frozen=True)
class DiffusersFolder:
    """What a diffusers folder holds, read from its JSON files alone (no weights, no diffusers import): the network
    and scheduler classes and configs, the network's input shape and classes. `load` reads the weights."""

    path: str
    model_dir: Path
    scheduler_dir: Path
    model_class: str
    model_config: dict
    scheduler_class: str
    scheduler_config: dict

    @property
    def shape(self) -> tuple[int, ...] | None:
        """(C, H, W) of the network's input (its config's in_channels and sample_size); None for a network that takes
        the data's size (the text-to-image transformers: `scm.diffusers.families`)."""
        from scm.diffusers.families import FAMILIES, latent_shape

        if self.model_config.get("in_channels") is None:
            raise ConfigError(f"{self.model_dir / 'config.json'}: no in_channels (the network's input shape)",
                              key="teacher")
        if self.model_class in FAMILIES and FAMILIES[self.model_class].any_size:
            return None
        return latent_shape(self.model_config, self.model_class)

    @property
    def takes_guidance(self) -> bool:
        """Whether the network takes a guidance scale itself (a guidance-distilled model: Flux-dev)."""
        from scm.diffusers.families import family_of

        return family_of(self.model_class, generic=True).own_guidance(self.model_config)

    @property
    def classes(self) -> int | None:
        """The number of classes of a class-conditional network; None for an unconditional one."""
        return num_classes(self.model_config)

    def parameterization(self) -> Parameterization:
        """The network's parameterisation, from its training scheduler (VP ε/v/x0, EDM, rectified flow)."""
        diffusers = diffusers_module()
        return Parameterization.from_scheduler(_class(diffusers, self.scheduler_dir, "scheduler_config.json")
                                               .from_config(self.scheduler_config))

    def load(self, *, device="cpu", dtype: torch.dtype | None = None) -> DiffusersModel:
        """The network (weights from safetensors only, eval mode, no gradients) and its scheduler."""
        diffusers = diffusers_module()
        model_cls = _class(diffusers, self.model_dir, "config.json")
        sched_cls = _class(diffusers, self.scheduler_dir, "scheduler_config.json")
        for weights in sorted(Path(self.model_dir).glob("*.safetensors")):
            read_header(weights)  # its header against the file, before diffusers maps it (scm.integrity)
        try:
            model = model_cls.from_pretrained(self.model_dir, use_safetensors=True, torch_dtype=dtype)
            scheduler = sched_cls.from_pretrained(self.scheduler_dir)
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"teacher {self.path}: diffusers could not load it ({e})", key="teacher") from None
        check_finite(model.state_dict(), f"teacher {self.model_dir}")
        return DiffusersModel(self.path, model.to(device).eval().requires_grad_(False), scheduler)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})", key="teacher") from None


def _class(diffusers, folder: Path, config_name: str):
    name = _read_json(folder / config_name).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ConfigError(f"{folder / config_name}: class {name!r} is not in diffusers {diffusers.__version__}",
                          key="teacher")
    return cls


def _denoiser_folder(root: Path) -> Path:
    index = _read_json(root / "model_index.json")
    for name in DENOISER_COMPONENTS:
        if name in index and (root / name / "config.json").is_file():
            return root / name
    raise ConfigError(f"{root}/model_index.json: no network component ({', '.join(DENOISER_COMPONENTS)}) with a "
                      "config.json", key="teacher")


def _scheduler_folder(root: Path, model_dir: Path) -> Path:
    for folder in (root / "scheduler", model_dir, model_dir.parent / "scheduler"):
        if (folder / "scheduler_config.json").is_file():
            return folder
    raise ConfigError(f"{root}: no scheduler_config.json (looked in scheduler/, beside the model and in "
                      "../scheduler); the teacher's training schedule decides its parameterisation", key="teacher")


def read_diffusers(path: str | Path) -> DiffusersFolder:
    """A local diffusers folder, described from its JSON files: a pipeline folder (model_index.json; the network is
    its unet/ or transformer/ component, the scheduler its scheduler/), or a model folder (config.json + weights)
    with scheduler_config.json beside it or in ../scheduler. Its weights must be safetensors (never unpickled)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"teacher {path}: no such folder (a diffusers pipeline or model folder)", key="teacher")
    model_dir = _denoiser_folder(root) if (root / "model_index.json").is_file() else root
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"teacher {path}: neither model_index.json nor config.json", key="teacher")
    sched_dir = _scheduler_folder(root, model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise ConfigError(f"{model_dir}: no .safetensors weights (scm never unpickles .bin/.ckpt files; convert "
                          "them with diffusers' save_pretrained(safe_serialization=True))", key="teacher")
    model_config, sched_config = _read_json(model_dir / "config.json"), _read_json(sched_dir / "scheduler_config.json")
    return DiffusersFolder(str(path), model_dir, sched_dir, str(model_config.get("_class_name")), model_config,
                           str(sched_config.get("_class_name")), sched_config)


def load_diffusers(path: str | Path, *, device="cpu", dtype: torch.dtype | None = None) -> DiffusersModel:
    """A diffusers network and scheduler from a local folder (`read_diffusers`), the network in eval mode without
    gradients; weights are read from safetensors only (never unpickled)."""
    return read_diffusers(path).load(device=device, dtype=dtype)
