"""Text encoders: prompts → per-token embeddings, their padding mask and a pooled embedding, the conditioning of a
text-to-image run (`scm.conditioning.Conditioning` with `text`).

Every encoder has the same interface (`TextEncoder`): `encode(prompts)` returns a `PromptEmbedding` (float32 tokens
[B, T, D] padded to the encoder's `max_tokens` T, a bool mask [B, T] that is True on real tokens, and a pooled
[B, P] embedding, or None for encoders without one), and `spec`, a JSON-able record of what it is. A run and a
prepared data set record the spec, so prompts are encoded later exactly as the training captions were
(`load_text_encoder(spec)`).

Three kinds:
- "builtin": a toy that needs no weights and never downloads anything, for demos and tests. A prompt is lower-cased
  and cut into words (runs of letters or digits) and single punctuation marks; each word's vector is drawn from a
  generator seeded by the SHA-256 of the word (so the same word has the same vector on every machine, with no
  vocabulary), with unit RMS, plus a sinusoidal position embedding of half that size, so that word order counts.
  The pooled embedding is the mean of the word vectors (zero for the empty prompt, whose mask is all False). It
  knows no synonyms and no grammar: a network learns what its words mean from the captions alone.
- a folder holding a `transformers` text encoder and its tokenizer (`scm.text_transformers`, the `text` extra).
- "pipeline": a diffusers text-to-image pipeline folder's own text encoders, encoding prompts exactly as the
  pipeline does for its network (`scm.diffusers.pipeline_text`, the `diffusers` extra).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from scm.errors import ConfigError

__all__ = ["BUILTIN", "BuiltinEncoder", "PromptEmbedding", "TextConfig", "TextEncoder", "check_prompts",
           "empty_prompt", "encode_prompts", "load_text_encoder"]

BUILTIN = "builtin"
MAX_PROMPT_CHARS = 2000  # a prompt longer than this is refused where prompts enter (it could only be truncated)
_WORDS = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass(frozen=True)
class PromptEmbedding:
    """Encoded prompts: `tokens` float32 [B, T, D], `mask` bool [B, T] (True: a real token; False: padding), `pooled`
    float32 [B, P] or None."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def none(cls, max_tokens: int, width: int, pooled_width: int) -> PromptEmbedding:
        """The encoding of no prompt at all (a batch of 0), with an encoder's shapes."""
        return cls(torch.zeros(0, max_tokens, width), torch.zeros(0, max_tokens, dtype=torch.bool),
                   torch.zeros(0, pooled_width) if pooled_width else None)

    def cond(self) -> dict[str, torch.Tensor]:
        """The network's conditioning inputs: text, text_mask and (where the encoder has one) text_pooled."""
        out = {"text": self.tokens, "text_mask": self.mask}
        if self.pooled is not None:
            out["text_pooled"] = self.pooled
        return out


@dataclass
class TextConfig:
    """A text-conditioned run's prompts: the encoder of its data's captions (its `spec`, set from the data when the
    run resolves it; None: the run takes no prompt), the embeddings' shapes and storage dtype (prompts encoded later
    are rounded to it, as the training captions were), and the caption dropout of training: the probability that a
    training example sees the empty prompt instead of its caption, which makes the network a classifier-free-
    guidance model (§5.2) as label dropout does for classes."""

    encoder: dict | None = None
    max_tokens: int = 0
    width: int = 0
    pooled_width: int = 0
    dtype: str = "float32"
    caption_dropout: float = 0.1

    def validate(self) -> None:
        from scm.errors import InvalidSetting

        if not (isinstance(self.caption_dropout, (int, float)) and 0 <= self.caption_dropout < 1):
            raise InvalidSetting("caption_dropout", self.caption_dropout, "must lie in [0, 1)")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise InvalidSetting("dtype", self.dtype, "must be float16, bfloat16 or float32")
        if self.encoder is not None and not (self.max_tokens >= 1 and self.width >= 1 and self.pooled_width >= 0):
            raise InvalidSetting("encoder", self.encoder, "needs max_tokens and width >= 1")

    @classmethod
    def of_data(cls, info: dict, caption_dropout: float = 0.1) -> TextConfig:
        """From a prepared set's meta["text"] (`scm.data.prepared`)."""
        return cls(dict(info["encoder"]), int(info["max_tokens"]), int(info["width"]), int(info.get("pooled_width")
                   or 0), str(info.get("dtype", "float32")), caption_dropout)


class TextEncoder(Protocol):
    spec: dict            # JSON-able: what the encoder is ({"kind": "builtin", …} | {"kind": "transformers", …})
    max_tokens: int       # T: prompts are padded (and truncated) to this many tokens
    width: int            # D: a token embedding's width
    pooled_width: int     # P: the pooled embedding's width (0: none)

    def encode(self, prompts: Sequence[str]) -> PromptEmbedding: ...


def check_prompts(prompts, what: str = "prompt") -> list[str]:
    """The prompts as a list of str, or ConfigError (key `what`) naming the first that is not text or is too long."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise ConfigError(f"{what} {i}: must be text, got {type(p).__name__}", key=what)
        if len(p) > MAX_PROMPT_CHARS:
            raise ConfigError(f"{what} {i}: {len(p)} characters; at most {MAX_PROMPT_CHARS}", key=what)
        if "\x00" in p:
            raise ConfigError(f"{what} {i}: holds a NUL character", key=what)
    return out


@functools.lru_cache(maxsize=65536)
def _word_vector(word: str, width: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
    v = torch.randn(width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.square().mean().sqrt()).float()  # unit RMS


def _positions(length: int, width: int) -> torch.Tensor:
    half = width // 2
    freq = 10_000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * freq[None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float() * math.sqrt(0.5)


class BuiltinEncoder:
    """The toy encoder of the module docstring: words hashed to fixed random vectors; no weights, no download."""

    def __init__(self, width: int = 64, max_tokens: int = 16):
        if not (isinstance(width, int) and width >= 2 and width % 2 == 0):
            raise ConfigError(f"builtin text encoder: width must be an even int >= 2, got {width!r}", key="width")
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ConfigError(f"builtin text encoder: max_tokens must be an int >= 1, got {max_tokens!r}",
                              key="max_tokens")
        self.width, self.max_tokens, self.pooled_width = width, max_tokens, width
        self.spec = {"kind": BUILTIN, "width": width, "max_tokens": max_tokens, "version": 1}
        self._pos = _positions(max_tokens, width)

    @staticmethod
    def words(prompt: str) -> list[str]:
        return _WORDS.findall(prompt.lower())

    def encode(self, prompts: Sequence[str]) -> PromptEmbedding:
        prompts = check_prompts(prompts)
        tokens = torch.zeros(len(prompts), self.max_tokens, self.width)
        mask = torch.zeros(len(prompts), self.max_tokens, dtype=torch.bool)
        pooled = torch.zeros(len(prompts), self.width)
        for i, p in enumerate(prompts):
            words = self.words(p)[: self.max_tokens]
            if not words:
                continue
            vecs = torch.stack([_word_vector(w, self.width) for w in words])
            tokens[i, : len(words)] = vecs + self._pos[: len(words)]
            mask[i, : len(words)] = True
            pooled[i] = vecs.mean(0)
        return PromptEmbedding(tokens, mask, pooled)


def load_text_encoder(spec: str | Path | dict, *, max_tokens: int | None = None, device="cpu") -> TextEncoder:
    """The encoder `spec` names: "builtin", a folder of a transformers text encoder (or of a diffusers pipeline with
    text_encoder/ and tokenizer/), or the `spec` dict a run or prepared set recorded. A pipeline folder whose
    model_index.json names a text-to-image pipeline class scm knows (`scm.diffusers.pipeline_text.PIPELINES`) gives
    that pipeline's own encoding (`max_tokens` is then its max_sequence_length). ConfigError (key "text_encoder")
    when it names nothing scm can load."""
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == BUILTIN:
            return BuiltinEncoder(int(spec.get("width", 64)), int(spec.get("max_tokens", 16)))
        if kind == "transformers":
            from scm.text_transformers import load_transformers_encoder

            return load_transformers_encoder(spec["path"], max_tokens=int(spec["max_tokens"]), device=device,
                                             expect=spec)
        if kind == "pipeline":
            from scm.diffusers.pipeline_text import load_pipeline_encoder

            return load_pipeline_encoder(spec["path"], device=device, expect=spec)
        raise ConfigError(f"text encoder record {spec!r}: unknown kind {kind!r}", key="text_encoder")
    if str(spec) == BUILTIN:
        return BuiltinEncoder(max_tokens=max_tokens or 16)
    from scm.diffusers.pipeline_text import load_pipeline_encoder, pipeline_class

    if pipeline_class(spec) is not None:
        return load_pipeline_encoder(spec, max_sequence_length=max_tokens, device=device)
    from scm.text_transformers import load_transformers_encoder

    return load_transformers_encoder(spec, max_tokens=max_tokens, device=device)


def encode_prompts(text: TextConfig, prompts: Sequence[str], device=None) -> dict[str, torch.Tensor]:
    """The network's inputs for `prompts` (text, text_mask, text_pooled) with the run's encoder, rounded to the
    storage dtype of its training captions, on `device`."""
    from scm.errors import SamplerError

    if text.encoder is None:
        raise SamplerError("prompt: this model takes no prompt", key="prompt")
    encoder = _encoder_of(json.dumps(text.encoder, sort_keys=True))
    got = encoder.encode(check_prompts(prompts))
    if (got.tokens.shape[1:], got.pooled is None) != ((text.max_tokens, text.width), not text.pooled_width):
        raise SamplerError(f"prompt: the text encoder {text.encoder.get('path', text.encoder['kind'])} gives tokens "
                           f"{tuple(got.tokens.shape[1:])}, the run was trained on ({text.max_tokens}, {text.width})",
                           key="prompt")
    dtype = getattr(torch, text.dtype)
    return {k: (v.to(dtype).float() if v.is_floating_point() else v).to(device) for k, v in got.cond().items()}


def empty_prompt(text: TextConfig) -> dict[str, torch.Tensor]:
    """The empty prompt's inputs (one row, on the CPU): the unconditional input of classifier-free guidance and of
    caption dropout, encoded once per encoder and shapes (training asks for it every step)."""
    key = json.dumps([text.encoder, text.max_tokens, text.width, text.pooled_width, text.dtype], sort_keys=True)
    return _empty_prompt(key)


@functools.lru_cache(maxsize=8)
def _empty_prompt(key: str) -> dict[str, torch.Tensor]:
    encoder, max_tokens, width, pooled_width, dtype = json.loads(key)
    return encode_prompts(TextConfig(encoder, max_tokens, width, pooled_width, dtype), [""])


@functools.lru_cache(maxsize=8)
def _encoder_of(spec_json: str) -> TextEncoder:
    return load_text_encoder(json.loads(spec_json))
