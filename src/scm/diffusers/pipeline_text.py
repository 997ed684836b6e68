"""Prompts encoded by a diffusers text-to-image pipeline's own text encoders, exactly as the pipeline encodes them for
its network: `PipelineTextEncoder`, scm's `TextEncoder` (`scm.text`) for a local pipeline folder, recorded as
{"kind": "pipeline", …} so that `scm.text.load_text_encoder(spec)` loads it again.

What each supported pipeline class (model_index.json's `_class_name`, `PIPELINES`) gives its network, and so what
is stored — tokens [B, T, D], mask [B, T], pooled [B, P] — with T at the pipeline's default lengths:

- sd3 (StableDiffusion3Pipeline): T = 77 CLIP + 256 T5 tokens: both CLIPs' penultimate states side by side,
  zero-padded to T5's width, then T5's last states; mask all True; pooled: both CLIPs' projections, concatenated.
- flux (FluxPipeline): T = 512 T5 tokens (256 for a network without a guidance embedder, FLUX.1-schnell): T5's
  last states; mask all True; pooled: CLIP's pooler output.
- sana (SanaPipeline): T = 300 Gemma2 tokens, its last states for Sana's complex human instruction followed by
  the prompt, of which the pipeline keeps the first token (<bos>) and the last 299 (the instruction cut out, but
  for the token where it meets the prompt); mask: the tokenizer's; no pooled.
- pixart (PixArtSigmaPipeline): T = 300 T5 tokens, its last states; mask: the tokenizer's; no pooled.
- sdxl (StableDiffusionXLPipeline): T = 77 CLIP tokens: both CLIPs' penultimate states, concatenated; mask all
  True; pooled: the second CLIP's projection (text_embeds).

The mask is the tokenizer's attention mask for the networks that take one (PixArt and Sana: prompt_attention_mask);
SD3's and Flux's transformers and SDXL's U-Net attend to every token, padding included (their pipelines run T5 and
CLIP without a mask, so padding positions carry values), and their mask is all True: the stored sequence is exactly
what the network sees. T5's and Gemma's length is the pipeline's default max_sequence_length, capped by that
tokenizer's model_max_length where it records one; CLIP's is its tokenizer's model_max_length (the pipelines' own).

How: the pipeline class's own `encode_prompt` runs on an instance built with only the text encoders and tokenizers
(every other component None; pipeline settings of model_index.json, such as SDXL's force_zeros_for_empty_prompt,
passed on), without classifier-free guidance, with the keyword arguments recorded in the spec's "call": the
max_sequence_length above and, where the pipeline's __call__ passes one by default, its complex_human_instruction
(Sana). PixArt's and Sana's encode_prompt lower-case and strip each prompt; captions are not cleaned further
(encode_prompt's clean_caption=False: PixArt's pipeline cleans them only where beautifulsoup4 and ftfy are
installed, which would make the encoding depend on the machine).

The empty prompt "" encodes as the pipeline's unconditional input, the negative-prompt embedding of
classifier-free guidance with the default negative prompt (encode_prompt with do_classifier_free_guidance=True):
that is not always the encoding of "" as a prompt — SDXL's is zeros (force_zeros_for_empty_prompt) and Sana's
has no complex human instruction. Flux has no negative prompt: "" is encoded as a prompt.

Loading reads model_index.json for the class and its text components (["transformers", class] entries), and loads
only those: weights from safetensors only (a folder with only pickles is refused, naming the file), their headers
checked and every weight finite; tokenizers from their tokenizer files; nothing is downloaded. The spec records the
SHA-256 of each encoder's weights and tokenizer files, and a recorded spec that the folder no longer matches is an
error naming the field. Models run in float32, in eval mode without gradients.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from scm.errors import CheckpointError, ConfigError, require_modules
from scm.text import PromptEmbedding, check_prompts
from scm.text_transformers import _TOKENIZER_FILES, _check_expected, _digest, _weights

__all__ = ["KIND", "PIPELINES", "PipelineFamily", "PipelineTextEncoder", "load_pipeline_encoder", "pipeline_class",
           "pipeline_files"]

KIND = "pipeline"
_BATCH = 64                  # prompts per encode_prompt call
_NO_LIMIT = 1_000_000        # a model_max_length at least this large is transformers' "no limit recorded"
_KEY = "text_encoder"


@dataclass(frozen=True)
class PipelineFamily:
    """How one pipeline class encodes prompts (module docstring): its text-encoder components (each one's tokenizer
    is the component of the same name with "tokenizer"), the names of what its encode_prompt returns in order
    (None: unused), its default max_sequence_length (None: it takes none) and the tokenizer whose model_max_length
    caps it, the length for a network without a guidance embedder (FLUX.1-schnell), whether its network takes the
    attention mask, and the encode_prompt arguments its __call__ passes by default."""

    name: str
    encoders: tuple[str, ...]
    outputs: tuple[str | None, ...]
    length: int | None = None
    length_tokenizer: str | None = None
    guidance_free_length: int | None = None
    masked: bool = False
    call_defaults: tuple[str, ...] = ()


_GUIDED = ("tokens", "null_tokens", "pooled", "null_pooled")  # (prompt, negative, pooled, negative pooled)
_MASKED = ("tokens", "mask", "null_tokens", "null_mask")      # (prompt, its mask, negative, negative's mask)
PIPELINES = {
    "StableDiffusion3Pipeline": PipelineFamily("sd3", ("text_encoder", "text_encoder_2", "text_encoder_3"), _GUIDED,
                                               256, "tokenizer_3"),
    "FluxPipeline": PipelineFamily("flux", ("text_encoder", "text_encoder_2"), ("tokens", "pooled", None), 512,
                                   "tokenizer_2", guidance_free_length=256),
    "SanaPipeline": PipelineFamily("sana", ("text_encoder",), _MASKED, 300, "tokenizer", masked=True,
                                   call_defaults=("complex_human_instruction",)),
    "PixArtSigmaPipeline": PipelineFamily("pixart", ("text_encoder",), _MASKED, 300, "tokenizer", masked=True),
    "StableDiffusionXLPipeline": PipelineFamily("sdxl", ("text_encoder", "text_encoder_2"), _GUIDED),
}


@dataclass(frozen=True)
class _Part:
    """One text-encoder component of a pipeline folder and its tokenizer, as model_index.json names them."""

    name: str
    model_class: str
    folder: Path
    weights: tuple[Path, ...]
    variant: str | None
    tokenizer: str
    tokenizer_class: str
    tokenizer_folder: Path

    def tokenizer_files(self) -> list[Path]:
        return [self.tokenizer_folder / n for n in _TOKENIZER_FILES if (self.tokenizer_folder / n).is_file()]

    def files(self) -> list[Path]:
        return [self.folder / "config.json", *self.weights, *self.tokenizer_files()]


# -- the folder ------------------------------------------------------------------------------------------------------
def _index(root: Path) -> dict:
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"pipeline {root / 'model_index.json'}: not a readable JSON file ({type(e).__name__}: {e})",
                          key=_KEY) from None
    if not isinstance(index, dict):
        raise ConfigError(f"pipeline {root / 'model_index.json'}: not a JSON object", key=_KEY)
    return index


def pipeline_class(path: str | Path) -> str | None:
    """The pipeline class of the folder `path` when its model_index.json names one that `PIPELINES` supports; None
    for anything else (no folder, no model_index.json, another class)."""
    root = Path(path).expanduser()
    if not (root / "model_index.json").is_file():
        return None
    name = _index(root).get("_class_name")
    return name if name in PIPELINES else None


def _transformers_entry(root: Path, index: dict, name: str, what: str) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and isinstance(entry[1], str)):
        raise ConfigError(f"pipeline {root}: model_index.json has no transformers {what} {name!r} (it has {entry!r}); "
                          f"its {index.get('_class_name')} encodes prompts with it", key=_KEY)
    return entry[1]


def _parts(root: Path, index: dict, family: PipelineFamily) -> list[_Part]:
    """The pipeline's text-encoder components, checked: named in model_index.json, a config.json and safetensors
    weights in each folder (`scm.text_transformers`' rules: pickles are refused, naming the file), tokenizer files
    in each tokenizer folder."""
    parts = []
    for name in family.encoders:
        tokenizer = name.replace("text_encoder", "tokenizer", 1)
        model_class = _transformers_entry(root, index, name, "text encoder")
        tokenizer_class = _transformers_entry(root, index, tokenizer, "tokenizer")
        folder, tokenizer_folder = root / name, root / tokenizer
        if not (folder / "config.json").is_file():
            raise ConfigError(f"pipeline {root}: no {folder / 'config.json'} (its {name}, a {model_class})", key=_KEY)
        weights, variant = _weights(folder)
        part = _Part(name, model_class, folder, tuple(weights), variant, tokenizer, tokenizer_class, tokenizer_folder)
        if not tokenizer_folder.is_dir() or not part.tokenizer_files():
            raise ConfigError(f"pipeline {root}: no tokenizer files in {tokenizer_folder} (tokenizer.json, "
                              f"tokenizer_config.json …), the {tokenizer_class} of its {name}", key=_KEY)
        parts.append(part)
    return parts


# -- loading ---------------------------------------------------------------------------------------------------------
def load_pipeline_encoder(path: str | Path, *, max_sequence_length: int | None = None, device="cpu",
                          expect: dict | None = None) -> PipelineTextEncoder:
    """The text encoders of the pipeline folder `path` as one `PipelineTextEncoder` (module docstring).

    `max_sequence_length`: the T5 or Gemma length (the pipeline family's default, capped by its tokenizer, when
    None; SDXL takes none). `expect`: a recorded spec, whose encode_prompt arguments are used, and which the
    folder must still match (classes, widths, lengths, digests): ConfigError naming the field otherwise. Loaded
    encoders are cached per (folder, length, device) while their files are unchanged. ConfigError (key
    "text_encoder") naming the folder or file for an unsupported pipeline class or a missing or unsafe component;
    MissingDependency without diffusers or transformers."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"pipeline {path}: no such folder (a diffusers pipeline folder with model_index.json)",
                          key=_KEY)
    if not (root / "model_index.json").is_file():
        raise ConfigError(f"pipeline {root}: no model_index.json (a diffusers pipeline folder has one)", key=_KEY)
    name = pipeline_class(root)
    if name is None:
        raise ConfigError(f"pipeline {root}: model_index.json names no pipeline class whose prompts scm encodes "
                          f"(it encodes those of {', '.join(PIPELINES)})", key=_KEY)
    if max_sequence_length is not None and (isinstance(max_sequence_length, bool) or not isinstance(
            max_sequence_length, int) or max_sequence_length < 1):
        raise ConfigError(f"pipeline {root}: max_sequence_length must be an int >= 1, got {max_sequence_length!r}",
                          key="max_tokens")
    if max_sequence_length is not None and PIPELINES[name].length is None:
        raise ConfigError(f"pipeline {root}: a {name} takes no max_sequence_length (its length is its tokenizers' "
                          "model_max_length)", key="max_tokens")
    files = _files(root, name)
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    recorded = None if expect is None else json.dumps(expect.get("call"), sort_keys=True)
    encoder = _encoder(str(root.resolve()), None if expect else max_sequence_length, recorded,
                       str(torch.device(device)), stamp)
    if expect is not None:
        _check_recorded(encoder.spec, expect)
    return encoder


def _files(root: Path, name: str) -> list[Path]:
    """What the encoding reads of the pipeline folder `root` (of class `name`): model_index.json, its network's
    config.json, and each text component's config, safetensors weights and tokenizer files."""
    parts = _parts(root, _index(root), PIPELINES[name])
    network = [root / n / "config.json" for n in ("transformer", "unet") if (root / n / "config.json").is_file()]
    return [root / "model_index.json", *network, *(f for part in parts for f in part.files())]


def pipeline_files(path: str | Path) -> list[str]:
    """The files (relative paths) a copy of the pipeline folder's text encoding needs (`_files`): what `scm export`
    copies beside a run so its pipeline encodes prompts wherever it is loaded. ConfigError as the loader's."""
    root = Path(path).expanduser()
    name = pipeline_class(root)
    if name is None:
        raise ConfigError(f"pipeline {root}: model_index.json names no pipeline class whose prompts scm encodes",
                          key=_KEY)
    return sorted(str(f.relative_to(root)) for f in _files(root, name))


@functools.lru_cache(maxsize=4)
def _encoder(path: str, max_sequence_length: int | None, recorded: str | None, device: str,
             stamp: tuple) -> PipelineTextEncoder:
    diffusers, transformers = require_modules("a diffusers pipeline's text encoders", "diffusers,text", "diffusers",
                                              "transformers")
    root = Path(path)
    index = _index(root)
    cls, family = getattr(diffusers, index["_class_name"], None), PIPELINES[index["_class_name"]]
    if cls is None:
        raise ConfigError(f"pipeline {root}: diffusers {diffusers.__version__} has no {index['_class_name']}",
                          key=_KEY)
    parts = _parts(root, index, family)
    loaded = {}
    for part in parts:
        loaded[part.name] = _load_model(transformers, part, device)
        loaded[part.tokenizer] = _load_tokenizer(transformers, part)
    pipe, config = _pipeline(cls, root, index, loaded)
    recorded_call = None if recorded is None else json.loads(recorded)
    call = recorded_call if isinstance(recorded_call, dict) else _call(cls, family, loaded, max_sequence_length,
                                                                       _network_config(root))
    unknown = set(call) - set(inspect.signature(cls.encode_prompt).parameters)
    if unknown:
        raise ConfigError(f"pipeline {root}: {cls.__name__}.encode_prompt takes no {sorted(unknown)[0]!r} (recorded "
                          f"in the text encoder's call)", key=_KEY)
    components = {p.name: {"class": p.model_class, "weights_sha256": _digest(p.weights), "tokenizer": p.tokenizer_class,
                           "tokenizer_sha256": _digest(p.tokenizer_files())} for p in parts}
    spec = {"kind": KIND, "path": path, "class": cls.__name__, "family": family.name,
            "mask": "tokenizer" if family.masked else "all", "call": call, "config": config,
            "components": components, "diffusers": diffusers.__version__}
    return PipelineTextEncoder(pipe, family, call, torch.device(device), spec)


def _transformers_class(transformers, name: str, base: str, where: Path):
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, getattr(transformers, base))):
        raise ConfigError(f"pipeline {where}: {name!r} (model_index.json) is not a transformers {base} class in "
                          f"transformers {transformers.__version__}", key=_KEY)
    return cls


def _load_model(transformers, part: _Part, device: str) -> torch.nn.Module:
    """The component's model in float32, eval mode, no gradients, on `device`; its safetensors headers checked
    first and every weight finite after."""
    from scm.integrity import check_finite, read_header

    cls = _transformers_class(transformers, part.model_class, "PreTrainedModel", part.folder)
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    try:
        for weights in part.weights:
            read_header(weights)
        model, loading = cls.from_pretrained(str(part.folder), local_files_only=True, use_safetensors=True,
                                             variant=part.variant, output_loading_info=True, **dtype)
        check_finite(dict(model.state_dict()), f"text encoder {_name(part.folder, part.weights)}")
    except CheckpointError as e:
        raise ConfigError(str(e), key=_KEY) from None
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as e:
        raise ConfigError(f"text encoder {part.folder}: cannot load it as a {cls.__name__} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})", key=_KEY) from None
    missing = [*loading.get("missing_keys", ()), *(k[0] for k in loading.get("mismatched_keys", ()))]
    if missing:
        raise ConfigError(f"text encoder {part.folder}: its weights are not those of its {cls.__name__} config "
                          f"({len(missing)} missing or of another shape, e.g. {sorted(missing)[0]})", key=_KEY)
    return model.float().eval().requires_grad_(False).to(device)


def _name(folder: Path, files: Sequence[Path]) -> Path:
    """The file, where there is one, else the folder: what an error names."""
    return files[0] if len(files) == 1 else folder


def _load_tokenizer(transformers, part: _Part):
    cls = _transformers_class(transformers, part.tokenizer_class, "PreTrainedTokenizerBase", part.tokenizer_folder)
    try:
        return cls.from_pretrained(str(part.tokenizer_folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as e:
        raise ConfigError(f"tokenizer {part.tokenizer_folder}: cannot load it as a {cls.__name__} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", key=_KEY) from None


def _pipeline(cls, root: Path, index: dict, loaded: dict):
    """(an instance of the pipeline class holding only the `loaded` text components, every other component None;
    the pipeline settings of model_index.json it was given)."""
    config, kwargs = {}, {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in loaded:
            kwargs[name] = loaded[name]
        elif name in index and not isinstance(index[name], list):
            kwargs[name] = config[name] = index[name]
        elif name in index or param.default is param.empty:
            kwargs[name] = None
    try:
        return cls(**kwargs), config
    except (TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ConfigError(f"pipeline {root}: diffusers' {cls.__name__} cannot be built from its text encoders alone "
                          f"({type(e).__name__}: {e})", key=_KEY) from None


def _network_config(root: Path) -> dict:
    """The pipeline network's config.json (transformer/ or unet/), or {} where there is none to read."""
    for name in ("transformer", "unet"):
        try:
            config = json.loads((root / name / "config.json").read_text())
        except (OSError, ValueError):
            continue
        return config if isinstance(config, dict) else {}
    return {}


def _call(cls, family: PipelineFamily, loaded: dict, max_sequence_length: int | None, network: dict) -> dict:
    """encode_prompt's keyword arguments (module docstring): max_sequence_length (given, or the family's default —
    the shorter one for a network without a guidance embedder, FLUX.1-schnell — capped by its tokenizer's
    model_max_length) and the __call__ defaults the family passes."""
    call = {}
    if family.length is not None:
        n = max_sequence_length
        if n is None:
            schnell = family.guidance_free_length and network.get("guidance_embeds") is False
            n = family.guidance_free_length if schnell else family.length
            limit = getattr(loaded[family.length_tokenizer], "model_max_length", None)
            n = min(n, limit) if isinstance(limit, int) and limit < _NO_LIMIT else n
        call["max_sequence_length"] = int(n)
    defaults = inspect.signature(cls.__call__).parameters
    for name in family.call_defaults:
        call[name] = defaults[name].default
    return call


def _check_recorded(spec: dict, expect: dict) -> None:
    """ConfigError (key "text_encoder") naming the first field of the recorded `expect` that `spec` contradicts."""
    _check_expected(spec, expect)  # kind, class, widths, max_tokens
    for field in ("family", "mask", "config"):
        if field in expect and spec.get(field) != expect[field]:
            raise ConfigError(f"text encoder at {spec['path']}: its {field} is {spec.get(field)!r}, the run recorded "
                              f"{expect[field]!r}", key=_KEY)
    recorded = expect.get("components") or {}
    for name, held in spec["components"].items():
        was = recorded.get(name, {})
        for field, words in (("class", "class"), ("tokenizer", "tokenizer class"), ("weights_sha256", "weights"),
                             ("tokenizer_sha256", "tokenizer files")):
            if field in was and held[field] != was[field]:
                raise ConfigError(f"text encoder at {spec['path']}: its {name}'s {words} changed since the run "
                                  f"recorded it ({held[field]}, recorded {was[field]})", key=_KEY)
    if set(recorded) - set(spec["components"]):
        raise ConfigError(f"text encoder at {spec['path']}: the run recorded components "
                          f"{sorted(set(recorded) - set(spec['components']))} it no longer has", key=_KEY)


# -- encoding --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(module: str):
    """The pipeline module's warnings silenced: it warns of every prompt cut at max_sequence_length, which is how
    prompts are stored (cut at T), once per batch."""
    logger = logging.getLogger(module)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class PipelineTextEncoder:
    """A pipeline's text encoders behind scm's `TextEncoder` interface (module docstring): `encode(prompts)` gives
    what the pipeline's network takes for them, "" its unconditional input."""

    def __init__(self, pipe, family: PipelineFamily, call: dict, device: torch.device, spec: dict):
        self.pipe, self.family, self.call, self.device = pipe, family, dict(call), device
        self._lock = threading.Lock()  # a tokenizer is reconfigured on each call: one call at a time (serve's threads)
        self.null = self._run([""], null=True)
        self.max_tokens, self.width = (int(n) for n in self.null.tokens.shape[1:])
        self.pooled_width = 0 if self.null.pooled is None else int(self.null.pooled.shape[1])
        self.spec = {**spec, "max_tokens": self.max_tokens, "width": self.width, "pooled_width": self.pooled_width}

    def encode(self, prompts: Sequence[str]) -> PromptEmbedding:
        prompts = check_prompts(prompts)
        if not prompts:
            return PromptEmbedding.none(self.max_tokens, self.width, self.pooled_width)
        parts = [self._run(prompts[i: i + _BATCH]) for i in range(0, len(prompts), _BATCH)]
        tokens, mask = torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts])
        pooled = torch.cat([p.pooled for p in parts]) if self.pooled_width else None
        empty = torch.tensor([p == "" for p in prompts])
        if empty.any():  # the unconditional input, not the encoding of "" as a prompt
            tokens[empty], mask[empty] = self.null.tokens, self.null.mask
            if pooled is not None:
                pooled[empty] = self.null.pooled
        return PromptEmbedding(tokens, mask, pooled)

    def _run(self, prompts: list[str], null: bool = False) -> PromptEmbedding:
        """encode_prompt's prompt embeddings for `prompts` (its negative ones, with the default negative prompt,
        when `null` and the pipeline has them), float32 on the CPU."""
        params = inspect.signature(self.pipe.encode_prompt).parameters
        required = {name: None for name, p in params.items()  # prompt_2 … (None: the prompt)
                    if p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD}
        kwargs = {**required, "prompt": list(prompts), "device": self.device, **self.call}
        if "do_classifier_free_guidance" in params:
            kwargs["do_classifier_free_guidance"] = null
        with self._lock, torch.no_grad(), _quiet(type(self.pipe).__module__):
            out = self.pipe.encode_prompt(**kwargs)
        got = {name: value for name, value in zip(self.family.outputs, out, strict=True) if name}
        prefix = "null_" if null and "null_tokens" in got else ""
        tokens = got[prefix + "tokens"].float().cpu()
        mask = (got[prefix + "mask"].bool().cpu() if self.family.masked
                else torch.ones(tokens.shape[:2], dtype=torch.bool))
        pooled = got.get(prefix + "pooled")
        return PromptEmbedding(tokens, mask, None if pooled is None else pooled.float().cpu())
