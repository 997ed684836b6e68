"""Captioned MNIST (scm.data.captions): the caption grammar and its inverse, the attributes measured on images
(stroke thickness, slant, size) against synthetic strokes, the quantile thresholds, determinism, prompt
adherence, and the built-in "mnist-captions" data sets."""

import itertools

import numpy as np
import torch

from scm.data.builtin import BUILTIN
from scm.data.captions import (
    ATTRIBUTES,
    THRESHOLDS,
    WORDS,
    adherence,
    caption,
    captions_for,
    mnist_attributes,
    parse_caption,
    quantile_thresholds,
)


def _attribute_choices():
    """Every combination of mentioned attributes and their words."""
    options = [[None, *[w for w in WORDS[a] if w is not None]] for a in ATTRIBUTES]
    for combo in itertools.product(*options):
        yield {a: w for a, w in zip(ATTRIBUTES, combo, strict=True) if w is not None}


def test_every_phrasing_parses_back_to_its_digit_and_attributes():
    seen = set()
    for digit, attrs, phrasing in itertools.product(range(10), list(_attribute_choices()), range(4)):
        text = caption(digit, attrs, phrasing)
        assert parse_caption(text) == (digit, attrs if phrasing else {}), text
        seen.add(text)
    assert len(seen) > 1000
    assert caption(7, {"thickness": "thick"}, 1) == "a thick seven"
    assert caption(7, {"thickness": "thick", "slant": "right"}, 2) == "seven, thick and slanted right"
    assert caption(7, {"size": "small", "slant": "upright"}, 3) == "a small upright digit 7"
    assert caption(7, {"size": "large"}, 0) == "the number seven"
    assert caption(8, {}, 1) == "an eight" and caption(1, {"slant": "upright"}, 1) == "an upright one"
    assert parse_caption("A THIN 3, leaning left") == (3, {"thickness": "thin", "slant": "left"})
    assert parse_caption("a cat") == (None, {})


def _canvas(n=1):
    return np.zeros((n, 1, 28, 28), np.uint8)


def _stroke(width: float, slant: float = 0.0, half_height: int = 9) -> np.ndarray:
    """A vertical bar of `width` pixels through the centre, sheared so that x moves `slant` per pixel up."""
    img = _canvas()
    yy, xx = np.mgrid[:28, :28]
    centre = 14 - slant * (yy - 14)  # up (smaller y) → right for slant > 0
    img[0, 0][(np.abs(xx - centre) < width / 2) & (np.abs(yy - 14) <= half_height)] = 255
    return img


def _ring(radius: float) -> np.ndarray:
    img = _canvas()
    yy, xx = np.mgrid[:28, :28]
    r = np.hypot(yy - 13.5, xx - 13.5)
    img[0, 0][np.abs(r - radius) < 1.2] = 255
    return img


def test_thickness_slant_and_size_of_synthetic_strokes():
    thin, thick = mnist_attributes(_stroke(1)), mnist_attributes(_stroke(5))
    assert thin["thickness"][0] < THRESHOLDS["thickness"][0] < THRESHOLDS["thickness"][1] < thick["thickness"][0]
    assert 3.5 < thick["thickness"][0] < 5 and thin["thickness"][0] <= 1 and thin["thickness_word"][0] == "thin"
    assert thick["thickness_word"][0] == "thick"
    right, left, upright = (mnist_attributes(_stroke(3, s)) for s in (0.5, -0.5, 0.1))
    assert abs(right["slant"][0] - 0.5) < 0.05 and abs(left["slant"][0] + 0.5) < 0.05
    assert (right["slant_word"][0], left["slant_word"][0], upright["slant_word"][0]) == ("right", "left", "upright")
    small, large = mnist_attributes(_ring(4), [0]), mnist_attributes(_ring(10), [0])
    assert small["size"][0] < large["size"][0] and abs(large["size"][0] - 10) < 0.5
    assert (small["size_word"][0], large["size_word"][0]) == ("small", "large")
    assert mnist_attributes(_ring(4))["size_word"][0] is None  # size needs the digit
    as_float = mnist_attributes(torch.from_numpy(_stroke(5, 0.5)).float() / 127.5 - 1)  # the model's space
    direct = mnist_attributes(_stroke(5, 0.5))
    assert all(np.allclose(as_float[a], direct[a], atol=1e-4) for a in ("thickness", "slant", "size"))


def test_quantile_thresholds_split_a_data_set_into_quarters():
    rng = np.random.default_rng(0)
    images = np.stack([_stroke(w, s) for w, s in zip(rng.uniform(1, 6, 400), rng.uniform(-0.6, 0.6, 400),
                                                      strict=True)])[:, 0]
    digits = np.arange(400) % 10
    measured = mnist_attributes(images, digits)
    th = quantile_thresholds(measured, digits)
    words = mnist_attributes(images, digits, th)
    for a, (low, _, high) in WORDS.items():
        share = [np.mean(words[f"{a}_word"] == w) for w in (low, high)]
        assert all(0.2 <= s <= 0.3 for s in share), (a, share)
    assert len(th["size"]) == 10 and all(lo <= hi for lo, hi in th["size"])


def test_captions_are_deterministic_and_the_first_names_every_attribute():
    rng = np.random.default_rng(1)
    images = np.stack([_stroke(w, s) for w, s in zip(rng.uniform(1, 6, 50), rng.uniform(-0.6, 0.6, 50),
                                                     strict=True)])[:, 0]
    labels = np.arange(50) % 10
    attrs = mnist_attributes(images, labels)
    a, b, c = (captions_for(labels, attrs, seed, 4) for seed in (3, 3, 4))
    assert a == b and a != c and all(len(x) == 4 for x in a)
    for i, caps in enumerate(a):
        expected = {k: attrs[f"{k}_word"][i] for k in ATTRIBUTES if attrs[f"{k}_word"][i] is not None}
        assert parse_caption(caps[0]) == (labels[i], expected)
        for text in caps[1:]:
            digit, said = parse_caption(text)
            assert digit == labels[i] and all(expected[k] == w for k, w in said.items())
    phrasings = {text.split()[0] for caps in a for text in caps}
    assert {"the", "a"} <= phrasings


def test_mnist_captions_built_in_and_adherence(real_mnist, monkeypatch):
    monkeypatch.setenv("SCM_DATA_DIR", real_mnist)
    from scm.data import load_dataset

    data = load_dataset("mnist-captions:test")
    assert len(data) == 10_000 and data.labels is not None and len(data.captions) == 10_000
    assert all(len(c) == 4 for c in data.captions[:100]) and "captions" in data.describe()
    first = data.caption_of(torch.arange(200))
    assert [parse_caption(t)[0] for t in first] == data.labels[:200].tolist()
    images, labels = data.images[:200], data.labels[:200]
    own = adherence(first, images, labels)
    assert own["digit_accuracy"] == 1.0 and own["attributes"] == 1.0 and own["slant_count"] > 0
    shuffled = adherence(first[1:] + first[:1], images, labels)
    assert shuffled["digit_accuracy"] < 0.3 and shuffled["attributes"] < 0.8
    probs = torch.nn.functional.one_hot(labels, 10).float()
    assert adherence(first, images, probs)["digit_accuracy"] == 1.0
    assert load_dataset("mnist-captions:test").captions == data.captions  # deterministic
    assert {"mnist-captions", "mnist-captions:train"} <= set(BUILTIN)


def test_thresholds_are_mnists_quartiles(real_mnist):
    with np.load(f"{real_mnist}/mnist/mnist.npz") as z:
        x, y = z["x_train"][:, None], z["y_train"]
    th = quantile_thresholds(mnist_attributes(x, y), y)
    assert np.allclose(th["thickness"], THRESHOLDS["thickness"], atol=1e-3)
    assert np.allclose(th["slant"], THRESHOLDS["slant"], atol=1e-3)
    assert np.allclose(th["size"], THRESHOLDS["size"], atol=1e-3)
