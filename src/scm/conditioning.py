"""What a run is conditioned on, written once: the network's inputs besides (x_t/σ_d, t), for training, for the
teacher's classifier-free guidance and for sampling.

A run is unconditional, conditioned on class labels (a data set's `labels`), or on prompts (a data set's caption
embeddings: `scm.text`), or on both. Its `Conditioning` says
- which of a data batch's conditioning tensors the network gets (`from_batch`): training (`scm.train.batches`);
  and, for prompts, which examples see the empty prompt instead of their caption (caption dropout);
- the unconditional ("null") input and the guided network F_s = F_u + s·(F_c − F_u) (§5.2; `null`, `guided`):
  no class, and the empty prompt's embedding; used by the sCD teacher (`scm.objectives`) and the sampling of a
  conditional diffusion run;
- how image i of a sampling request gets its condition (`sample_inputs`): the class asked for, or class
  i mod the number of classes, so that an image depends on (seed, i) only; the prompt asked for, encoded by the
  run's text encoder (`scm generate`, `scm serve`, the exported pipeline);
- which guidance scale the model takes and its default (`guidance`, `default_guidance`), and why a requested class
  or scale does not fit (`refusal`, `check`).

It is derived from a run's resolved configuration (`Conditioning.of_run`), or from what an exported pipeline
records, never decided twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from scm.errors import SamplerError
from scm.text import TextConfig, empty_prompt, encode_prompts
from scm.trigflow import expand

__all__ = ["GUIDANCE", "NO_CLASS", "Conditioning", "guidance_as_input", "guided"]

# A class index that means "no class": the unconditional input of class-labelled CFG as a row, so that it stacks with
# the conditional rows. A network that reads it so says `reads_no_class` (scm's own networks, whose index outside
# the classes is a zero one-hot row; a diffusers network or teacher with an unconditional class, which maps it
# there); for any other function the unconditional input stays None, its unconditional mode, in a call of its own.
NO_CLASS = -1

# How a model takes a guidance scale s: not at all; by classifier-free guidance, two evaluations of a
# class-conditional diffusion model combined (§5.2); or as a network input (a student distilled with a guided
# teacher, §5.2, whose output is already F_s).
GUIDANCE = ("none", "cfg", "input")


def guided(fn: Callable[..., torch.Tensor], null: dict, *, one_call: bool = True,
           max_stacked: int | None = None) -> Callable[..., torch.Tensor]:
    """Classifier-free guidance: F_s = F_null + s·(F_cond − F_null) (paper §5.2, App. G.2; s = 1 is no guidance).

    Returns g(x_scaled, t, *, guidance, **cond) where `guidance` is a float or a tensor [B] (one scale per
    example, as sCD samples it). The unconditional evaluation replaces entries of cond by `null` (a run's
    `Conditioning.null()`: {"labels": None}, the network's unconditional mode, for class labels; the empty prompt's
    embedding, one row broadcast to the batch, for prompts).

    With `one_call`, the two evaluations are one call on the batch stacked with itself (conditional rows, then
    unconditional ones) where every input stacks: tensors of the same shape past the batch dimension, as prompts
    and their empty prompt are, and the stacked batch has at most `max_stacked` rows (None: any). Class indices
    stack where `fn` reads NO_CLASS as no class (`fn.reads_no_class`): the None of the unconditional input becomes
    a row of NO_CLASS; for other functions None is no row, and they take two calls. One call halves the launches and
    weight reads, which pays at small batches: on two CPU cores the text teacher's guided evaluation took 0.72× the
    two calls' time at batch 8 and 0.92× at 32, but 1.06× at 64 and 1.24× at 128 (benchmarks/results/
    cfg_one_call.md). The values equal two calls' up to the order of floating-point sums (a kernel may tile a
    larger batch differently)."""
    null = dict(null)

    def g(x_scaled: torch.Tensor, t: torch.Tensor, *, guidance, **cond) -> torch.Tensor:
        if isinstance(guidance, (int, float)) and guidance == 1:
            return fn(x_scaled, t, **cond)
        uncond = {**cond, **_batched(null, x_scaled)}
        fits = max_stacked is None or 2 * x_scaled.shape[0] <= max_stacked
        if one_call and fits and getattr(fn, "reads_no_class", False):
            uncond = _no_class_row(cond, uncond)
        stacked = _stacked(cond, uncond) if one_call and fits and t.ndim == 1 else None
        if stacked is None:
            F_c, F_u = fn(x_scaled, t, **cond), fn(x_scaled, t, **uncond)
        else:
            F_c, F_u = fn(torch.cat([x_scaled, x_scaled]), torch.cat([t, t]), **stacked).chunk(2)
        s = torch.as_tensor(guidance, dtype=F_c.dtype, device=F_c.device)
        if s.ndim == 1:
            s = expand(s, F_c)
        return F_u + s * (F_c - F_u)

    return g


def guidance_as_input(cond: dict, batch: int, device) -> dict:
    """cond with a guidance scale given as a number made a [B] float32 tensor, the value every network makes of a
    number (`scm.nets.layers.guidance_scales`). For compiled callers: the compiler specialises on a Python float, so
    each new scale (`scm serve`'s slider, a pipeline's guidance_scale) would compile a graph of its own, where a
    tensor is an input of one graph."""
    g = cond.get("guidance")
    if isinstance(g, (int, float)) and not isinstance(g, bool):
        return {**cond, "guidance": torch.full((batch,), float(g), dtype=torch.float32, device=device)}
    return cond


def _no_class_row(cond: dict, uncond: dict) -> dict:
    """uncond with its labels None (no class) written as a row of NO_CLASS per conditional class index."""
    labels = cond.get("labels")
    if uncond.get("labels", 0) is None and isinstance(labels, torch.Tensor) and labels.ndim == 1 \
            and not labels.is_floating_point():
        return {**uncond, "labels": torch.full_like(labels, NO_CLASS)}
    return uncond


def _stacked(cond: dict, uncond: dict) -> dict | None:
    """cond's and uncond's inputs stacked along the batch (cond's rows first), or None when one does not stack."""
    out = {}
    for k in {**cond, **uncond}:
        c, u = cond.get(k), uncond.get(k)
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor) and c.ndim >= 1 and c.shape == u.shape \
                and c.dtype == u.dtype:
            out[k] = torch.cat([c, u])
        elif c is u or (not isinstance(c, torch.Tensor) and not isinstance(u, torch.Tensor) and c == u):
            out[k] = c
        else:
            return None
    return out


def _batched(null: dict, like: torch.Tensor) -> dict:
    """The null inputs with one-row tensors repeated to the batch of `like`, on its device."""
    n = like.shape[0]
    return {k: v.to(like.device).expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v
            for k, v in null.items()}


def _drop_rows(cond: dict, null: dict, p: float, generator: torch.Generator) -> dict:
    """cond with each example's prompt replaced by the null one with probability p (caption dropout)."""
    n = cond["text"].shape[0]
    drop = torch.rand(n, generator=generator) < p
    if not drop.any():
        return cond
    out = dict(cond)
    for k, v in _batched(null, cond["text"]).items():
        keep = ~drop.to(v.device).view(n, *([1] * (v.ndim - 1)))
        out[k] = torch.where(keep, cond[k], v)
    return out


@dataclass(frozen=True)
class Conditioning:
    """A run's conditioning (module docstring): `classes` class labels (0: none), `text` its prompts (None: none),
    how it takes a guidance scale (`guidance`, one of GUIDANCE) and the scale used when none is asked
    (`default_guidance`)."""

    classes: int = 0
    guidance: str = "none"
    default_guidance: float | None = None
    text: TextConfig | None = None

    def __post_init__(self):
        if not (isinstance(self.classes, int) and self.classes >= 0):
            raise ValueError(f"Conditioning.classes must be an int >= 0, got {self.classes!r}")
        if self.guidance not in GUIDANCE:
            raise ValueError(f"Conditioning.guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        if self.guidance == "cfg" and not (self.classes or self.text):
            raise ValueError("Conditioning: classifier-free guidance needs classes or prompts")
        if self.text is not None and self.text.encoder is None:
            raise ValueError("Conditioning.text needs its encoder")
        if (self.default_guidance is None) != (self.guidance == "none"):
            raise ValueError("Conditioning: a model that takes a guidance scale has a default one, and only it")

    @classmethod
    def of_run(cls, cfg) -> Conditioning:
        """The conditioning of a resolved `scm.config.TrainConfig`: its network's classes; a diffusion run with
        classes is guided by CFG (default s = 1: unguided); a student with a guidance input takes the scale, by
        default the lower end of the range it was distilled with (1 without one)."""
        classes, embed = int(cfg.net.label_dim or 0), bool(getattr(cfg.net, "guidance_embed", False))
        text = cfg.text if getattr(cfg.net, "text_dim", 0) and cfg.text.encoder is not None else None
        if cfg.method == "diffusion":
            return cls(classes, "cfg", 1.0, text) if classes or text else cls(classes)
        if not embed:
            return cls(classes, text=text)
        trained = getattr(cfg.loss, "guidance", None)
        return cls(classes, "input", float(trained[0]) if trained else 1.0, text)

    @property
    def kind(self) -> str:
        """"text", "labels" or "none": what a request may ask for."""
        return "text" if self.text else "labels" if self.classes else "none"

    def requires(self) -> tuple[str, ...]:
        """The conditioning tensors a training data set must provide (`scm.data.dataset.Dataset.conditions`)."""
        text = ("text", "text_mask", *(("text_pooled",) if self.text.pooled_width else ())) if self.text else ()
        return ("labels",) * bool(self.classes) + text

    # -- training ---------------------------------------------------------------------------------------------------
    def from_batch(self, cond: dict, generator: torch.Generator | None = None) -> dict:
        """The network's inputs of a data batch's conditioning tensors (a run ignores what its network does not take);
        with a `generator` (training), caption dropout replaces prompts by the empty one."""
        out = {k: cond[k] for k in self.requires()}
        if self.text and generator is not None and self.text.caption_dropout:
            text_null = {k: v for k, v in self.null().items() if k != "labels"}
            out = _drop_rows(out, text_null, self.text.caption_dropout, generator)
        return out

    def null(self) -> dict:
        """The unconditional input of classifier-free guidance (replaces the conditional one): no class, and the
        empty prompt's embedding (one row, broadcast by `guided`)."""
        out = {"labels": None} if self.classes else {}
        if self.text:
            out |= empty_prompt(self.text)
        return out

    def guided(self, fn: Callable[..., torch.Tensor], **how) -> Callable[..., torch.Tensor]:
        """fn with classifier-free guidance, its unconditional evaluation given this conditioning's null input (`how`:
        `guided`'s one_call and max_stacked)."""
        return guided(fn, self.null(), **how)

    # -- sampling ---------------------------------------------------------------------------------------------------
    def network(self, net: Callable[..., torch.Tensor], **how) -> Callable[..., torch.Tensor]:
        """The function sampled: the network, guided by CFG for a class-conditional diffusion run (`how`: as
        `guided`'s)."""
        return self.guided(net, **how) if self.guidance == "cfg" else net

    def refusal(self, class_labels=None, guidance=None, prompts=None) -> tuple[str, str] | None:
        """(setting, reason) when a requested class label (an int, or one per image, None = the default), prompt
        (text, or one per image) or guidance scale does not fit this model; None when all do."""
        if prompts is not None and not self.text:
            return "prompt", "this model takes no prompt" + (" (it takes class labels)" if self.classes else "")
        if prompts is None and self.text:
            return "prompt", "this model is text-conditioned: give a prompt (\"\" for none)"
        if prompts is not None:
            many = prompts if isinstance(prompts, (list, tuple)) else [prompts]
            if not all(isinstance(p, str) for p in many):
                return "prompt", "must be text"
            if not many:
                return "prompt", "give at least one"
        if class_labels is not None:
            many = isinstance(class_labels, (list, tuple))
            given = [c for c in (class_labels if many else [class_labels]) if c is not None]
            if given and not self.classes:
                return "class_label", "this model takes prompts, not class labels" if self.text else \
                    "this model is unconditional"
            if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < self.classes for c in given):
                return "class_label", f"this model has classes 0..{self.classes - 1}"
        if guidance is not None:
            if not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and math.isfinite(guidance)
                    and guidance > 0):
                return "guidance", "must be a scale > 0"
            if self.guidance == "none":
                return "guidance", ("this model takes no guidance: it has neither a guidance input (a student "
                                    "distilled with classifier-free guidance) nor the classes of a class-conditional "
                                    "diffusion model")
        return None

    def check(self, class_labels=None, guidance=None, prompts=None) -> None:
        """SamplerError (key "class_label", "prompt" or "guidance") for a request `refusal` refuses."""
        why = self.refusal(class_labels, guidance, prompts)
        if why is not None:
            key, reason = why
            value = {"class_label": class_labels, "guidance": guidance}.get(key, prompts)
            if key == "prompt" and isinstance(value, (list, tuple)) and len(value) > 3:
                value = f"[{len(value)} prompts]"
            raise SamplerError(f"{key}={value!r}: {reason}", key=key)

    def sample_inputs(self, index: torch.Tensor, class_labels: int | Sequence[int | None] | None = None,
                      guidance: float | None = None, prompts: str | Sequence[str] | None = None) -> dict:
        """The network's inputs for images `index` ([B] image numbers): class labels (`class_labels`: one for all,
        or one per image; None: image i gets class i mod the number of classes), the prompt's embedding (`prompts`:
        one for all, or one per image) and the guidance scale (or the default). Checked (`check`) first."""
        self.check(class_labels, guidance, prompts)
        cond = {}
        if self.text:
            asked = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts] * len(index)
            if len(asked) != len(index):
                raise SamplerError(f"prompt: {len(asked)} prompts for {len(index)} images", key="prompt")
            cond |= encode_prompts(self.text, asked, index.device)
        if self.classes:
            labels = index % self.classes
            if class_labels is not None:
                asked = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels] * len(index)
                if len(asked) != len(index):
                    raise SamplerError(f"class_label: {len(asked)} labels for {len(index)} images", key="class_label")
                given = torch.tensor([-1 if c is None else c for c in asked], device=index.device)
                labels = torch.where(given >= 0, given, labels)
            cond["labels"] = labels
        scale = guidance if guidance is not None else self.default_guidance
        if scale is not None:
            cond["guidance"] = float(scale)
        return cond
