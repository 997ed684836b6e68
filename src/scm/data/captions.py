"""Captioned MNIST: captions generated from each digit, its class and three attributes measured on the image
itself; their grammar and its inverse; and how well generated images agree with the prompts they were made from.

Attributes (`mnist_attributes`, vectorised; images uint8 0…255 or floats in the model's space [-1, 1]):

- thickness: the mean stroke width in pixels, 2·A/P, with A the ink area and P the length of the ink's boundary
  (the edges between ink and background pixels, the image's border counting as background), ink being the pixels
  of at least half the full intensity. A stroke of width w and length L ≫ w has A ≈ w·L and P ≈ 2·L.
- slant: the shear of the ink's second moments, −cov(x, y)/var(y) (intensity-weighted, y pointing down, so > 0
  when the top leans right): the tangent of the lean from the vertical.
- size: the ink's extent, its root-mean-square distance from its centre (√(var x + var y), in pixels). MNIST's
  digits are all scaled to fit a 20-pixel box, so their height hardly varies (87 % of the training digits are
  20 pixels tall); what varies is how far the ink spreads, and that depends first on the digit (a one spreads
  less than a zero). So size is relative to the digit: its thresholds are per class.

Words, from thresholds at quantiles of MNIST's 60,000 training digits (`THRESHOLDS`, measured by
`quantile_thresholds`): below the 25 % quantile "thin" / "left" / "small"; above the 75 % quantile "thick" /
"right" / "large"; in between no thickness or size word (a caption does not say "medium") and the slant word
"upright". Each outer word covers about a quarter of the digits (of each digit, for size). The words are relative
to MNIST: most handwritten digits lean right a little, so "upright" spans a lean of −4° to +16° and "slanted left"
starts at 4° to the left.

    thickness (px)   thin < 1.647 ≤ (none) ≤ 2.333 < thick
    slant (tan)      left < −0.073 ≤ upright ≤ 0.293 < right
    size (px)        small < q25(digit) ≤ (none) ≤ q75(digit) < large     (per digit: from 5.69–6.20 for ones
                                                                        to 7.14–7.91 for zeros)

Caption grammar (`caption`, `captions_for`; parsed back by `parse_caption`). ⟨name⟩ is the digit's word (zero …
nine), ⟨d⟩ its numeral, ⟨a⟩ the article: "an" before "eight" and "upright", else "a". A caption mentions some of
the digit's attributes, always in the order size, thickness, slant, each in an adjective or a predicate form:

    attribute    adjective form                           predicate form
    size         small | large                            small | large
    thickness    thin | thick                             thin | thick
    slant        left-leaning | upright | right-leaning   slanted left | upright | slanted right

    phrasing 0   the number ⟨name⟩                        "the number seven"         (no attribute)
    phrasing 1   ⟨a⟩ ⟨adjectives⟩ ⟨name⟩                  "a thick seven", "an eight"
    phrasing 2   ⟨name⟩, ⟨predicates⟩                     "seven, thick and slanted right"
    phrasing 3   ⟨a⟩ ⟨adjectives⟩ digit ⟨d⟩               "a small upright digit 7"

Predicates are joined as "x", "x and y", "x, y and z"; phrasing 2 with no attribute is just "⟨name⟩". An image's
first caption mentions every attribute it has a word for (its phrasing drawn among 1 to 3): it is the one
evaluation and sample grids use. Its other captions take the other phrasings, in a random order, each mentioning
a random subset (each attribute kept with probability 1/2). Drawn from one `numpy.random.Generator(seed)`:
the same labels, attributes and seed give the same captions.

`parse_caption` reads a caption back as (digit, {attribute: word}), the attributes it mentions with the words
"thin"/"thick", "left"/"upright"/"right", "small"/"large": parse(caption(d, attrs, k)) == (d, attrs) for every
phrasing k. It is a keyword reader, so it also reads prompts a person writes in these words ("a thin 3").

`adherence` scores generated images against their prompts: digit accuracy (from a classifier's predictions,
e.g. `scm.metrics.classifier`) and, per attribute, the share of images whose measured word is the one asked for
(chance, for images distributed like MNIST: about 25 % for the outer words, 50 % for "upright").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ATTRIBUTES", "DIGITS", "THRESHOLDS", "WORDS", "adherence", "caption", "captions_for", "mnist_attributes",
           "parse_caption", "quantile_thresholds", "with_captions"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTES = ("size", "thickness", "slant")  # the order in which a caption names them
WORDS = {"size": ("small", None, "large"), "thickness": ("thin", None, "thick"), "slant": ("left", "upright", "right")}
QUANTILES = (0.25, 0.75)
# (low, high) thresholds: the 25 % and 75 % quantiles over MNIST's training digits (quantile_thresholds); size's
# per digit 0 … 9
THRESHOLDS = {
    "thickness": (1.6471, 2.3333),
    "slant": (-0.0730, 0.2933),
    "size": ((7.1406, 7.9100), (5.6853, 6.1969), (6.8375, 7.5355), (6.8657, 7.4997), (5.8212, 6.5067),
             (6.7574, 7.4767), (6.0841, 6.7485), (6.4981, 7.1255), (6.4726, 7.0504), (5.9122, 6.4709)),
}
ADJECTIVE = {"left": "left-leaning", "right": "right-leaning"}
PREDICATE = {"left": "slanted left", "right": "slanted right"}
PHRASINGS = 4
_INK = 0.5  # intensity (0…1) from which a pixel is ink
_CHUNK = 4096  # images measured at a time (memory: about 40 kB an image)


# -- measuring ------------------------------------------------------------------------------------------------------
def _intensity(images) -> torch.Tensor:
    """[N, H, W] float32 intensities in [0, 1]: uint8 / 255, floats (the model's [-1, 1]) mapped by (x + 1) / 2."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"MNIST attributes need greyscale images [N, 1, H, W], got {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must be [N, 1, H, W] or [N, H, W], got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255
    return ((x.float() + 1) / 2).clamp(0, 1)


def _measure(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stroke width, slant, extent) of intensities [n, H, W] (module docstring)."""
    ink = (x >= _INK).float()
    # the boundary of a set of pixels, the image's border included, is 4·A − 2·(pairs of adjacent ink pixels)
    pairs = (ink[:, 1:] * ink[:, :-1]).flatten(1).sum(1) + (ink[:, :, 1:] * ink[:, :, :-1]).flatten(1).sum(1)
    area = ink.flatten(1).sum(1).double()
    width = 2 * area / (4 * area - 2 * pairs.double()).clamp(min=1)
    h, w = x.shape[1:]
    yy, xx = (v.double().flatten() for v in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    basis = torch.stack([torch.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], dim=1)  # [H·W, 6]
    moments = x.reshape(x.shape[0], -1).double() @ basis
    mass = moments[:, 0].clamp(min=1e-9)
    cx, cy, sxx, syy, sxy = (moments[:, k] / mass for k in range(1, 6))
    vxx, vyy, vxy = sxx - cx * cx, syy - cy * cy, sxy - cx * cy
    slant = -vxy / vyy.clamp(min=1e-9)
    extent = (vxx + vyy).clamp(min=0).sqrt()
    return width.float(), slant.float(), extent.float()


def _words(values: np.ndarray, low, high, words: tuple) -> np.ndarray:
    """The word of each value: words[0] below `low`, words[2] above `high`, words[1] (maybe None) between."""
    index = np.where(values < low, 0, np.where(values > high, 2, 1))
    return np.array(words, dtype=object)[index]


def mnist_attributes(images, digits=None, thresholds: dict | None = None) -> dict:
    """The attributes of MNIST-like digits (module docstring): images uint8 [N, 1, H, W] (0…255) or floats in the
    model's space [-1, 1]. Returns {"thickness", "slant", "size"}: float32 arrays [N] of the measurements, and
    {"thickness_word", "slant_word", "size_word"}: object arrays [N] of words (None: no word). Size words need the
    digits (int [N]: the labels, or the digits asked for), its thresholds being per digit; without them there is
    no size word. `thresholds` defaults to MNIST's (`THRESHOLDS`)."""
    th = THRESHOLDS if thresholds is None else thresholds
    parts = [_measure(_intensity(images[i: i + _CHUNK])) for i in range(0, len(images), _CHUNK)]
    values = {a: torch.cat([p[k] for p in parts]).numpy() if parts else np.zeros(0, np.float32)
              for k, a in enumerate(("thickness", "slant", "size"))}
    out = dict(values)
    for a in ("thickness", "slant"):
        out[f"{a}_word"] = _words(values[a], *th[a], WORDS[a])
    if digits is None:
        out["size_word"] = np.full(len(values["size"]), None, dtype=object)
    else:
        d = np.asarray(digits, dtype=np.int64)
        table = np.asarray(th["size"], dtype=np.float64)
        out["size_word"] = _words(values["size"], table[d, 0], table[d, 1], WORDS["size"])
    return out


def quantile_thresholds(attributes: dict, digits) -> dict:
    """The thresholds (25 % and 75 % quantiles) of measured attributes (`mnist_attributes`), size's per digit 0 … 9:
    how `THRESHOLDS` was made from MNIST's training digits."""
    d = np.asarray(digits)
    out = {a: tuple(float(q) for q in np.quantile(attributes[a], QUANTILES)) for a in ("thickness", "slant")}
    out["size"] = tuple(tuple(float(q) for q in np.quantile(attributes["size"][d == c], QUANTILES))
                        for c in range(10))
    return out


# -- the grammar ----------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word in ("eight", "upright") else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def caption(digit: int, attributes: dict[str, str], phrasing: int) -> str:
    """One caption of `digit` naming `attributes` ({attribute: word}, words of `WORDS`) with phrasing 0 … 3 (module
    docstring; phrasing 0 names no attribute)."""
    name = DIGITS[int(digit)]
    said = [(a, attributes[a]) for a in ATTRIBUTES if attributes.get(a) is not None]
    if phrasing == 0:
        return f"the number {name}"
    if phrasing == 2:
        return f"{name}, {_join([PREDICATE.get(w, w) for _, w in said])}" if said else name
    adjectives = [ADJECTIVE.get(w, w) for _, w in said]
    head = [*adjectives, name if phrasing == 1 else "digit"]
    text = f"{_article(head[0])} {' '.join(head)}"
    return text if phrasing == 1 else f"{text} {int(digit)}"


def captions_for(labels, attributes: dict, seed: int = 0, per_image: int = 4) -> list[list[str]]:
    """`per_image` captions of each digit (module docstring): labels int [N], attributes from `mnist_attributes`
    (its *_word arrays), deterministic for `seed`."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    first = rng.integers(1, PHRASINGS, n)
    order = np.argsort(rng.random((n, PHRASINGS)), axis=1)
    keep = rng.random((n, max(per_image, 1), len(ATTRIBUTES))) < 0.5
    words = [attributes[f"{a}_word"] for a in ATTRIBUTES]
    out = []
    for i in range(n):
        have = {a: w[i] for a, w in zip(ATTRIBUTES, words, strict=True) if w[i] is not None}
        rest = [int(k) for k in order[i] if k != first[i]]
        caps = [caption(labels[i], have, int(first[i]))]
        for j in range(1, per_image):
            subset = {a: have[a] for k, a in enumerate(ATTRIBUTES) if a in have and keep[i, j, k]}
            caps.append(caption(labels[i], subset, rest[(j - 1) % len(rest)]))
        out.append(caps)
    return out


_TOKENS = re.compile(r"[a-z0-9]+")
_KEYWORDS = {"thin": ("thickness", "thin"), "thick": ("thickness", "thick"), "small": ("size", "small"),
             "large": ("size", "large"), "upright": ("slant", "upright"), "left": ("slant", "left"),
             "right": ("slant", "right")}


def parse_caption(text: str) -> tuple[int | None, dict[str, str]]:
    """(digit or None, {attribute: word}) that a caption names: the inverse of `caption` (module docstring). The
    first digit named (a word or a numeral) counts; an attribute named twice keeps its first word."""
    digit, attrs = None, {}
    for token in _TOKENS.findall(text.lower()):
        if digit is None and (token in DIGITS or (len(token) == 1 and token.isdigit())):
            digit = DIGITS.index(token) if token in DIGITS else int(token)
        elif token in _KEYWORDS:
            a, w = _KEYWORDS[token]
            attrs.setdefault(a, w)
    return digit, attrs


# -- the data set and the scores ------------------------------------------------------------------------------------
def with_captions(data, seed: int = 0, per_image: int = 4):
    """`data` (MNIST as an `ImageData`, with labels) with its generated captions."""
    from dataclasses import replace

    attrs = mnist_attributes(data.images, data.labels.numpy())
    return replace(data, captions=captions_for(data.labels.numpy(), attrs, seed, per_image))


def _predicted(digits) -> np.ndarray:
    p = digits.detach().cpu().numpy() if isinstance(digits, torch.Tensor) else np.asarray(digits)
    return p.argmax(1) if p.ndim == 2 else p.astype(np.int64)


def adherence(prompts: Sequence[str], images, digits) -> dict:
    """How well generated images (uint8 [N, 1, H, W] or floats in [-1, 1]) agree with the prompts they were made
    from. `digits`: the digits a classifier sees in them (int [N], or its probabilities or logits [N, 10]).
    Returns {"digit_accuracy", "digit_count"} over the prompts that name a digit, and for each attribute a
    "<attribute>_agreement" (the share of the images whose prompt names it that have the word asked for, measured
    as `mnist_attributes`; size relative to the digit asked, or else seen) and "<attribute>_count"; "attributes"
    is the agreement over every attribute asked for. Agreements over no prompt are None."""
    parsed = [parse_caption(p) for p in prompts]
    seen = _predicted(digits)
    if len(parsed) != len(seen):
        raise ValueError(f"{len(parsed)} prompts but {len(seen)} predicted digits")
    asked = np.array([d if d is not None else -1 for d, _ in parsed])
    measured = mnist_attributes(images, np.where(asked >= 0, asked, seen))
    if len(measured["slant"]) != len(parsed):
        raise ValueError(f"{len(parsed)} prompts but {len(measured['slant'])} images")
    named = asked >= 0
    out = {"digit_accuracy": float((seen[named] == asked[named]).mean()) if named.any() else None,
           "digit_count": int(named.sum())}
    hits = total = 0
    for a in ATTRIBUTES:
        rows = [(i, w[a]) for i, (_, w) in enumerate(parsed) if a in w]
        agree = sum(measured[f"{a}_word"][i] == w for i, w in rows)
        out[f"{a}_agreement"] = agree / len(rows) if rows else None
        out[f"{a}_count"] = len(rows)
        hits, total = hits + agree, total + len(rows)
    out["attributes"] = hits / total if total else None
    return out
