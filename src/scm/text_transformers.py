"""Text encoders from a local folder of `transformers` weights, behind scm's `TextEncoder` interface (`scm.text`).

A folder holds config.json, safetensors weights and the tokenizer's files; or it is a diffusers pipeline folder
whose text_encoder/ and tokenizer/ sub-folders hold them (a folder named text_encoder_N/ takes its tokenizer from
a tokenizer_N/ beside it). Nothing is downloaded, and weights are read from safetensors only, never unpickled.

The family comes from config.json's model_type:
- CLIP ("clip_text_model"): CLIPTextModel, or CLIPTextModelWithProjection where config.json's architectures
  names it. Tokens: the last hidden state; pooled: text_embeds (with projection) or pooler_output (the EOS
  token's state). CLIP's causal attention never lets a real token see padding, and the mask (the tokenizer's
  attention mask) marks the padded positions after the EOS as False.
- T5 ("t5", "mt5", "umt5"): the encoder only (T5EncoderModel …). Tokens: the last hidden state; no pooled.
- decoder-only language models (gemma, gemma2, gemma3_text, llama, mistral, qwen2, qwen3), loaded with AutoModel
  as the base model. Tokens: the last hidden state (Sana's conditioning, from Gemma2); no pooled.

Models run in float32 (T5 overflows in float16) in eval mode without gradients; prompts are padded on the right
to `max_tokens` and truncated there; the results are float32 on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from scm.errors import ConfigError, require_modules
from scm.files import sha256_of
from scm.text import PromptEmbedding, check_prompts

__all__ = ["FAMILIES", "TransformersEncoder", "encoder_folders", "load_transformers_encoder"]

# config.json's model_type → family; the class of a T5 family member; the default length of each family
FAMILIES = {"clip_text_model": "clip", "t5": "t5", "mt5": "t5", "umt5": "t5", **dict.fromkeys(
    ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"), "decoder")}
_ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_DEFAULT_TOKENS = {"clip": 77, "t5": 120, "decoder": 300}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.model",
                    "sentencepiece.bpe.model")
_SINGLE = re.compile(r"model(?:\.(\w+))?\.safetensors")
_INDEX = re.compile(r"model\.safetensors\.index(?:\.(\w+))?\.json")
_PICKLE = re.compile(r".*\.(bin|pt|pth|ckpt|pkl|pickle)|.*\.bin\.index\.json|tf_model\.h5|flax_model\.msgpack")
_BATCH = 64  # prompts run through the model at once
_TOKENIZING = threading.Lock()  # a fast tokenizer is reconfigured on each call: one call at a time (threads of serve)


class TransformersEncoder:
    """A transformers text encoder and its tokenizer (see the module docstring for what each family returns)."""

    def __init__(self, model, tokenizer, family: str, max_tokens: int, device: torch.device, spec: dict):
        self.model, self.tokenizer, self.family, self.device = model, tokenizer, family, device
        self.max_tokens, self.width, self.pooled_width = max_tokens, spec["width"], spec["pooled_width"]
        self.spec = spec

    def encode(self, prompts: Sequence[str]) -> PromptEmbedding:
        prompts = check_prompts(prompts)
        if not prompts:
            return PromptEmbedding.none(self.max_tokens, self.width, self.pooled_width)
        parts = [self._encode(prompts[i: i + _BATCH]) for i in range(0, len(prompts), _BATCH)]
        tokens, mask, pooled = (list(x) for x in zip(*parts, strict=True))
        return PromptEmbedding(torch.cat(tokens), torch.cat(mask), torch.cat(pooled) if self.pooled_width else None)

    def _encode(self, prompts: list[str]):
        with _TOKENIZING:
            batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        extra = {"use_cache": False} if self.family == "decoder" else {}
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, **extra)
        pooled = None
        if self.pooled_width:
            pooled = (out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output).float().cpu()
        return out.last_hidden_state.float().cpu(), mask.bool().cpu(), pooled


def load_transformers_encoder(path: str | Path, *, max_tokens: int | None = None, device="cpu",
                              expect: dict | None = None) -> TransformersEncoder:
    """The text encoder in the folder `path` (see the module docstring), padding prompts to `max_tokens` tokens.

    `max_tokens` defaults to the tokenizer's model_max_length where that is at most 512, else to 77 for CLIP (its
    position table), 120 for T5 (PixArt's length) and 300 for decoder-only models (Sana's): tokenizers without a
    recorded limit report a huge placeholder. It is capped by the model's position table. `expect`: a recorded
    `spec`; ConfigError naming the field when the folder no longer matches it (class, widths, weights digest).

    Loaded encoders are cached per (folder, max_tokens, device) while their files are unchanged (the weights are
    hashed once per load, which reads them all). ConfigError (key "text_encoder") for a missing folder,
    config.json, tokenizer or safetensors weights, an unknown model_type, or weights that are only pickles;
    MissingDependency (extra "text") without transformers."""
    model_dir, tokenizer_dir = encoder_folders(path)
    weights, _variant = _weights(model_dir)
    tokenizer_files = [tokenizer_dir / n for n in _TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    files = [model_dir / "config.json", *weights, *tokenizer_files]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"text encoder {path}: max_tokens must be an int >= 1, got {max_tokens!r}", key="max_tokens")
    encoder = _encoder(str(Path(path).expanduser().resolve()), max_tokens, str(torch.device(device)), stamp)
    if expect is not None:
        _check_expected(encoder.spec, expect)
    return encoder


@functools.lru_cache(maxsize=8)
def _encoder(path: str, max_tokens: int | None, device: str, stamp: tuple) -> TransformersEncoder:
    model, tokenizer, info = _load(path, device, stamp)
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_tokens is None:
        n = tokenizer.model_max_length
        max_tokens = n if isinstance(n, int) and 1 <= n <= 512 else _DEFAULT_TOKENS[info["family"]]
        max_tokens = min(max_tokens, limit) if isinstance(limit, int) else max_tokens
    elif isinstance(limit, int) and max_tokens > limit:
        raise ConfigError(f"text encoder {path}: max_tokens {max_tokens} exceeds its {limit} positions "
                          "(config.json's max_position_embeddings)", key="max_tokens")
    spec = {"kind": "transformers", "path": path, "model_type": info["model_type"], "class": type(model).__name__,
            "max_tokens": max_tokens, "width": info["width"], "pooled_width": info["pooled_width"],
            "weights_sha256": info["weights_sha256"], "tokenizer_sha256": info["tokenizer_sha256"]}
    return TransformersEncoder(model, tokenizer, info["family"], max_tokens, torch.device(device), spec)


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, stamp: tuple):
    """The model (float32, eval, no gradients, on `device`), its tokenizer and what the spec records of them."""
    model_dir, tokenizer_dir = encoder_folders(path)
    weights, variant = _weights(model_dir)
    config = _read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"text encoder {model_dir}: model_type {model_type!r} (config.json) is not one scm loads; "
                          f"it loads {', '.join(FAMILIES)}", key="text_encoder")
    (transformers,) = require_modules("a text encoder from a folder", "text", "transformers")
    family = FAMILIES[model_type]
    if family == "clip":
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    else:
        cls = getattr(transformers, _ENCODER_CLASSES[model_type]) if family == "t5" else transformers.AutoModel
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    try:
        model, loading = cls.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True,
                                             variant=variant, output_loading_info=True, **dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True,
                                                               trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as e:
        raise ConfigError(f"text encoder {model_dir}: cannot load it as a {cls.__name__} with its tokenizer "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          key="text_encoder") from None
    missing = [*loading.get("missing_keys", ()), *(k[0] for k in loading.get("mismatched_keys", ()))]
    if missing:
        raise ConfigError(f"text encoder {model_dir}: its weights are not those of its {cls.__name__} config "
                          f"({len(missing)} missing or of another shape, e.g. {sorted(missing)[0]})",
                          key="text_encoder")
    _prepare_tokenizer(tokenizer, tokenizer_dir)
    model = model.float().eval().requires_grad_(False).to(device)
    pooled_width = 0
    if family == "clip":
        pooled_width = model.config.projection_dim if with_projection else model.config.hidden_size
    info = {"family": family, "model_type": model_type, "width": int(model.config.hidden_size),
            "pooled_width": int(pooled_width), "weights_sha256": _digest(weights),
            "tokenizer_sha256": _digest([tokenizer_dir / n for n in _TOKENIZER_FILES if (tokenizer_dir / n).is_file()])}
    return model, tokenizer, info


def _prepare_tokenizer(tokenizer, folder: Path) -> None:
    """Pad and truncate on the right (real tokens first, as scm's masks expect); a tokenizer without a padding
    token pads with its end-of-sequence token, whose positions the mask marks as padding."""
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"text encoder tokenizer {folder}: has neither a padding nor an end-of-sequence token",
                              key="text_encoder")
        tokenizer.pad_token = tokenizer.eos_token


def encoder_folders(path: str | Path) -> tuple[Path, Path]:
    """(the model's folder, the tokenizer's folder) at `path`: itself for both, or a pipeline folder's
    text_encoder/ and tokenizer/ (text_encoder_N/ takes tokenizer_N/ beside it); ConfigError naming what is
    missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"text encoder {path}: {'not a folder' if p.exists() else 'no such folder'} (expected a "
                          "transformers text encoder folder, or a diffusers pipeline folder)", key="text_encoder")
    model_dir = p if (p / "config.json").is_file() or not (p / "text_encoder" / "config.json").is_file() else (
        p / "text_encoder")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"text encoder {p}: no config.json (expected a transformers text encoder folder, or a "
                          "diffusers pipeline folder with text_encoder/ and tokenizer/ sub-folders)",
                          key="text_encoder")
    candidates = [model_dir]
    if model_dir.name.startswith("text_encoder"):
        candidates.append(model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer", 1))
    for folder in candidates:
        if any((folder / n).is_file() for n in _TOKENIZER_FILES):
            return model_dir, folder
    raise ConfigError(f"text encoder {p}: no tokenizer (tokenizer.json, tokenizer_config.json or vocabulary files) "
                      f"in {' or '.join(str(c) for c in candidates)}", key="text_encoder")


def _weights(folder: Path) -> tuple[list[Path], str | None]:
    """The safetensors files from_pretrained reads in `folder` (model.safetensors, its shards, or one variant such
    as model.fp16.safetensors) and the variant; ConfigError when there are none, naming a pickle if one is there."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    found: dict[str | None, str] = {}
    for name in names:
        m = _INDEX.fullmatch(name) or _SINGLE.fullmatch(name)
        if m and (m.group(1) not in found or m.re is _INDEX):
            found[m.group(1)] = name
    if not found:
        pickles = [n for n in names if _PICKLE.fullmatch(n)]
        if pickles:
            raise ConfigError(f"text encoder {folder}: its weights are only in {pickles[0]}, a pickle, which scm never "
                              "loads (unpickling can run code); save them as safetensors (model.safetensors)",
                              key="text_encoder")
        raise ConfigError(f"text encoder {folder}: no safetensors weights (model.safetensors)", key="text_encoder")
    if None not in found and len(found) > 1:
        raise ConfigError(f"text encoder {folder}: no model.safetensors, and several variants "
                          f"({', '.join(sorted(found.values()))}); keep one", key="text_encoder")
    variant = None if None in found else next(iter(found))
    name = found[variant]
    if not _INDEX.fullmatch(name):
        return [folder / name], variant
    try:
        shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"text encoder {folder / name}: not a safetensors index ({type(e).__name__})",
                          key="text_encoder") from None
    absent = [s for s in shards if not (folder / s).is_file()]
    if absent or not shards:
        raise ConfigError(f"text encoder {folder}: the shard {absent[0] if absent else '(none)'} listed in {name} "
                          "is missing", key="text_encoder")
    return [folder / s for s in shards], variant


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"text encoder {folder / 'config.json'}: not a JSON config ({type(e).__name__}: {e})",
                          key="text_encoder") from None
    if not isinstance(config, dict):
        raise ConfigError(f"text encoder {folder / 'config.json'}: not a JSON object", key="text_encoder")
    return config


def _digest(files: Sequence[Path]) -> str:
    """One file's SHA-256; for several, the SHA-256 of their `sha256sum` listing ("<hex>  <name>\\n" per file, by
    name), which `sha256sum * | sha256sum` reproduces."""
    digests = sorted((f.name, sha256_of(f).hexdigest()) for f in files)
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{h}  {n}\n" for n, h in digests).encode()).hexdigest()


_FIELDS = {"kind": "kind", "model_type": "model_type", "class": "class", "width": "token width",
           "pooled_width": "pooled width", "max_tokens": "max_tokens"}
_DIGESTS = {"weights_sha256": "weights", "tokenizer_sha256": "tokenizer files"}


def _check_expected(spec: dict, expect: dict) -> None:
    """ConfigError (key "text_encoder") naming the first field of the recorded `expect` that `spec` contradicts."""
    for field, words in _FIELDS.items():
        if field in expect and spec.get(field) != expect[field]:
            raise ConfigError(f"text encoder at {spec['path']}: its {words} is {spec.get(field)!r}, the run recorded "
                              f"{expect[field]!r}", key="text_encoder")
    for field, words in _DIGESTS.items():
        if expect.get(field) is not None and spec.get(field) != expect[field]:
            raise ConfigError(f"text encoder at {spec['path']}: its {words} changed since the run recorded them "
                              f"(sha256 {spec.get(field)}, recorded {expect[field]})", key="text_encoder")
