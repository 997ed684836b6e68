"""LoRA students: sCD of a diffusers teacher into low-rank adapters on the teacher's own network (the LCM-LoRA recipe,
Luo et al. 2023, with sCM's objective; `scm train … lora.rank=R [lora.targets=…]`).

The student is the teacher's network with `peft` adapters (the library diffusers itself loads LoRAs with) on the
attention and feed-forward layers (`DEFAULT_LORA_TARGETS`): W x + (alpha/r)·B A x, B zero-initialised, so a fresh
student computes exactly its teacher's F. Only the adapters and what the teacher has not (the adaptive-weight head,
a guidance input of the student's own) train; every weight of the teacher is frozen and held once: the sCD teacher
is the same network with its adapters and the student's guidance input switched off (`BaseTeacher`,
`DiffusersNet.base_only`). peft's LoRA layers are plain PyTorch (a linear map added to the base layer's output), so
forward-mode AD carries the tangent through them with no rule of ours (tests/test_lora.py checks the JVP against
float64 central differences).

Checkpoints, EMA averages and post-hoc EMA snapshots hold the trained tensors only (`DiffusersNet.trained_keys`);
the frozen base is read again from the teacher's folder (`DiffusersNetConfig.lora_base`) when a run is loaded, so
the folder must stay where the run found it. `scm export` writes the adapters as diffusers' LoRA file
(`pytorch_lora_weights.safetensors`, loaded by `pipe.load_lora_weights(…)` into the teacher's own pipeline) beside
the `SCMPipeline`, and on request a merged full network instead.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from scm.errors import ConfigError, MissingDependency
from scm.lora_config import LoRAConfig

__all__ = [
    "ADAPTER",
    "BaseTeacher",
    "adapter_state",
    "add_adapters",
    "lora_prefix",
    "merge_adapters",
    "set_adapters",
]

ADAPTER = "default"  # peft's adapter name: one adapter per student


def _peft():
    try:
        import peft
    except ImportError:
        raise MissingDependency("LoRA students need peft: pip install 'scm[lora]'", extra="lora") from None
    return peft


def add_adapters(model: nn.Module, lora: LoRAConfig) -> list[str]:
    """Inject peft LoRA adapters of `lora` into `model` (in place; B = 0, so its output is unchanged) and freeze
    every other parameter of it; the names of the adapted modules. ConfigError (key "lora.targets") when no module
    of the model matches the targets."""
    peft = _peft()
    names = lora.module_names
    matched = [n for n, m in model.named_modules() if _matches(n, names) and isinstance(m, (nn.Linear, nn.Conv2d))]
    if not matched:
        raise ConfigError(f"lora.targets: no linear or convolution layer of the {type(model).__name__} is named "
                          f"{', '.join(names)}", key="lora.targets")
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                             target_modules=matched, init_lora_weights=True)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return matched


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of `model` on or off (off: the base layers alone, the teacher's network)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under peft's names without the adapter's (`….lora_A.weight`): diffusers' LoRA format
    once prefixed with the pipeline component's name (`lora_prefix`)."""
    return _peft().get_peft_model_state_dict(model, adapter_name=ADAPTER)


def lora_prefix(model_class: str) -> str:
    """The pipeline component a model class is ("unet" for U-Nets, else "transformer"): the prefix of its keys in
    diffusers' LoRA files."""
    return "unet" if model_class.startswith("UNet") else "transformer"


def merge_adapters(model: nn.Module) -> nn.Module:
    """The adapters added into their base layers and removed: a plain copy of the network (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.get_base_layer())
    return model


class BaseTeacher:
    """The sCD teacher of a LoRA student: the student's own network with its adapters and guidance input off, in
    eval mode and without gradients (it computes the teacher's F: the base weights are the teacher's, frozen).
    `takes_guidance` as the diffusers teacher it replaces (Flux-dev's guidance input is part of the base)."""

    def __init__(self, net: nn.Module, takes_guidance: bool = False):
        self.net, self.takes_guidance = net, takes_guidance
        self.reads_no_class = getattr(net, "reads_no_class", False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        with self.net.base_only():
            return self.net(x, t, **cond)


@contextlib.contextmanager
def switched_off(net: nn.Module, model: nn.Module):
    """`net` in eval mode with `model`'s adapters off, restored afterwards (`DiffusersNet.base_only`)."""
    training = net.training
    net.eval()
    set_adapters(model, False)
    try:
        yield
    finally:
        set_adapters(model, True)
        net.train(training)
