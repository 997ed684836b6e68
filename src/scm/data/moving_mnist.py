"""Moving MNIST (Srivastava, Mansimov & Salakhutdinov 2015, "Unsupervised learning of video representations using
LSTMs"), generated here from the offline MNIST digits into prepared video sets (`scm.data.prepared`).

The scene, as the benchmark's generator makes it: each digit (a 28×28 MNIST image drawn uniformly, with
replacement, from the split's digits) moves inside a S×S frame on a straight line at a constant speed and
bounces off the walls. Its top-left corner lives in the unit square of positions (x, y) ∈ [0, 1]², mapped to
pixels as floor((S − d)·x) for a digit of side d; it starts at a uniform position with a uniform direction θ and
moves `step` = 0.1 of that range per frame (v = step·(cos θ, sin θ)); a coordinate that leaves [0, 1] is put
back on the wall and its velocity component changes sign. As in the benchmark's generator the position is
advanced before the first frame is drawn. Digits are combined by the pixel-wise maximum (overlaps stay
in 0…255, the brighter digit shows). Every pixel of every digit stays inside the frame (the test checks it).

Variants (`VARIANTS`):
- "moving-mnist": the standard benchmark: two digits, 64×64 frames, 20 frames a clip, unlabelled (two digits
  have no single class); 10,000 training clips (as many as the widely used test file `mnist_test_seq.npy`) and
  2,000 test clips: 820 MB + 164 MB of uint8;
- "moving-mnist-tiny": one digit, 32×32 frames, 8 frames a clip, labelled with the digit's class (a
  class-conditional video set); 20,000 training and 2,000 test clips (164 MB + 16 MB). Why these sizes: it is the
  standard scene at half scale (the digit box-filtered to 14×14 by 2×2 means, the frame 32×32, so the digit
  travels over the same share of the frame, 18 of 32 pixels, at the same 0.1 of it a frame), small enough that
  a video network trains on it on a CPU in minutes (a clip is 8·32² = 8 k pixels, 10× fewer than the
  standard's 82 k), with 8 frames: enough to show a straight motion and, for about half of the clips, a bounce.
  It is generated in seconds.

Training clips take their digits from MNIST's training split (60,000), test clips from its test split (10,000),
so that no test clip shows a digit image seen in training. Each split has its own seeded generator
(`numpy.random.default_rng([seed, split])`), and clips are drawn up front and rendered in chunks: the same seed
gives the same bytes, an interrupted generation continues where it stopped (`PreparedWriter`), and memory does
not grow with the count. Each set records its generator settings in meta.json ("moving_mnist") and, beside its
arrays, each clip's digits: digits.npy (int64 [N, k]: the classes, k digits a clip) and mnist_index.npy
(int64 [N, k]: which image of the MNIST split each is): `clip_digits`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scm.data.modality import DEFAULT_FPS
from scm.errors import DataError

__all__ = ["VARIANTS", "MovingMnist", "clip_digits", "fetch_moving_mnist", "moving_mnist_dir", "render",
           "trajectories"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class MovingMnist:
    """One variant of the generator (module docstring): `size`² frames, `frames` a clip, `digits` digits of side
    `digit_size` (28, or 14 by 2×2 means), moving `step` of their range a frame; `clips` per split; labelled
    with the digit's class when there is one digit."""

    size: int = 64
    frames: int = 20
    digits: int = 2
    digit_size: int = 28
    step: float = 0.1
    clips: dict[str, int] = field(default_factory=lambda: {"train": 10_000, "test": 2_000})

    @property
    def labelled(self) -> bool:
        return self.digits == 1

    def check(self) -> None:
        if self.digit_size not in (14, 28) or self.size < self.digit_size or self.frames < 1 or self.digits < 1:
            raise DataError(f"moving MNIST: {self}: needs digit_size 14 or 28, size ≥ digit_size, ≥ 1 frame and digit")
        for split, n in self.clips.items():
            if split not in SPLITS or not isinstance(n, int) or n < 1:
                raise DataError(f"moving MNIST: clips[{split!r}]={n!r}: a positive count per split {SPLITS}",
                                key="clips")


VARIANTS = {
    "moving-mnist": MovingMnist(),
    "moving-mnist-tiny": MovingMnist(size=32, frames=8, digits=1, digit_size=14,
                                     clips={"train": 20_000, "test": 2_000}),
}


def trajectories(rng: np.random.Generator, n: int, frames: int, digits: int, step: float = 0.1) -> np.ndarray:
    """Positions in [0, 1]² of `digits` digits in `n` clips, float64 [n, frames, digits, 2] as (y, x): uniform
    starts and directions, `step` a frame, clamped to the walls with the velocity reflected (module docstring)."""
    pos = rng.random((n, digits, 2))
    theta = rng.random((n, digits)) * 2 * np.pi
    vel = np.stack([np.sin(theta), np.cos(theta)], axis=-1)
    out = np.empty((n, frames, digits, 2))
    for t in range(frames):
        pos = pos + vel * step
        low, high = pos <= 0, pos >= 1
        vel = np.where(low | high, -vel, vel)
        pos = np.clip(pos, 0, 1)
        out[:, t] = pos
    return out


def _small(digits: np.ndarray, side: int) -> np.ndarray:
    """uint8 [n, 28, 28] digits at `side` (28, or 14 by rounded 2×2 means)."""
    if side == 28:
        return digits
    s = digits.astype(np.int32).reshape(-1, 14, 2, 14, 2).sum(axis=(2, 4))
    return ((s + 2) // 4).astype(np.uint8)


def render(digits: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
    """Clips uint8 [n, frames, size, size] of the digit images uint8 [n, k, d, d] at `positions` (float [n, frames,
    k, 2] in [0, 1]², top-left corners as a share of size − d), combined by the pixel-wise maximum."""
    n, frames, k, _ = positions.shape
    d = digits.shape[-1]
    corner = np.floor(positions * (size - d)).astype(np.int64)  # [n, T, k, 2]
    canvas = np.zeros((n, frames, size, size), np.uint8)
    clip = np.arange(n)[:, None, None, None]
    frame = np.arange(frames)[None, :, None, None]
    span = np.arange(d)
    for j in range(k):
        rows = (corner[:, :, j, 0, None] + span)[:, :, :, None]  # [n, T, d, 1]
        cols = (corner[:, :, j, 1, None] + span)[:, :, None, :]  # [n, T, 1, d]
        here = canvas[clip, frame, rows, cols]
        canvas[clip, frame, rows, cols] = np.maximum(here, digits[:, None, j])
    return canvas


def moving_mnist_dir(name: str, split: str, root: Path | None = None) -> Path:
    """Where a variant's split is kept: <data dir>/<name>/<split>/ (`scm.data.builtin.data_dir`)."""
    from scm.data.builtin import data_dir

    return (data_dir() if root is None else Path(root)) / name / split


def clip_digits(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(classes, MNIST indices) of each clip's digits, int64 [N, k] each, of a generated set's directory."""
    path = Path(path)
    try:
        return (np.load(path / "digits.npy", allow_pickle=False), np.load(path / "mnist_index.npy",
                                                                         allow_pickle=False))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: no digit record of a generated Moving MNIST set ({e})") from None


def _mnist(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 28, 28] digits, int64 [n] classes) of a split of the cached MNIST."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[f"x_{split}"], z[f"y_{split}"].astype(np.int64)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot read the cached MNIST ({e})", key="mnist") from None


def _generate(spec: MovingMnist, name: str, split: str, seed: int, out: Path, mnist: tuple, chunk: int, log) -> Path:
    """One split into the prepared directory `out` from MNIST's (digits, classes) (resumable: `PreparedWriter`)."""
    from scm.data.prepared import PreparedWriter

    images, classes = mnist
    n, rng = spec.clips[split], np.random.default_rng([seed, SPLITS.index(split)])
    index = rng.integers(0, len(images), (n, spec.digits))
    positions = trajectories(rng, n, spec.frames, spec.digits, spec.step)
    settings = {**asdict(spec), "clips": n, "split": split, "seed": seed, "generator": 1,
                "mnist_sha256": hashlib.sha256(images.tobytes()).hexdigest()}
    key = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()
    shape = (1, spec.frames, spec.size, spec.size)
    writer = PreparedWriter(out, shape, "uint8", n, labelled=spec.labelled, key=key)
    for i in range(writer.written, n, chunk):
        sl = slice(i, min(i + chunk, n))
        digits = _small(images[index[sl].reshape(-1)], spec.digit_size)
        digits = digits.reshape(-1, spec.digits, spec.digit_size, spec.digit_size)
        clips = render(digits, positions[sl], spec.size)[:, None]
        writer.append(clips, classes[index[sl, 0]] if spec.labelled else None)
    np.save(writer.partial / "digits.npy", classes[index].astype(np.int64))
    np.save(writer.partial / "mnist_index.npy", index.astype(np.int64))
    meta = {"source": f"{name} {split} (seed {seed})", "class_names": [str(c) for c in range(10)] if spec.labelled
            else None, "fps": DEFAULT_FPS, "frames": spec.frames, "stride": spec.frames,
            "moving_mnist": {k: v for k, v in settings.items() if k != "clips"}}
    path = writer.finish(meta)
    log(f"{name} {split}: {n} clips of {spec.frames}×{spec.size}×{spec.size} at {path}")
    return path


def fetch_moving_mnist(name: str = "moving-mnist", root: Path | None = None, *, clips: dict[str, int] | None = None,
                       seed: int = 0, chunk: int = 512, log=print) -> dict[str, Path]:
    """Generate the variant `name` (`VARIANTS`) into <root>/<name>/{train,test}/ (root: the data directory) and
    return the two paths; `clips` overrides the counts per split. A split already generated with the same
    settings is kept; one generated with others is an error (remove it to generate again). Needs the cached MNIST
    (fetched first when absent: `scm.data.builtin.fetch_mnist`)."""
    from scm.data.builtin import data_dir, fetch_mnist
    from scm.data.prepared import is_prepared, load_prepared

    if name not in VARIANTS:
        raise DataError(f"unknown Moving MNIST variant {name!r}; one of {', '.join(VARIANTS)}", key="name")
    spec = VARIANTS[name]
    spec = MovingMnist(**{**asdict(spec), "clips": {**spec.clips, **(clips or {})}})
    spec.check()
    root = data_dir() if root is None else Path(root)
    if not (root / "mnist" / "mnist.npz").is_file():
        fetch_mnist(root=root, log=log)
    paths = {}
    for split in SPLITS:
        out = moving_mnist_dir(name, split, root)
        if is_prepared(out):
            have = load_prepared(out, in_memory=False)
            made = have.meta.get("moving_mnist", {})
            if len(have) != spec.clips[split] or made.get("seed") != seed:
                raise DataError(f"{out}: holds {len(have)} clips of seed {made.get('seed')}, not the "
                                f"{spec.clips[split]} of seed {seed} asked for; remove it to generate it again",
                                key="out")
            log(f"{name} {split}: already generated at {out}")
            paths[split] = out
            continue
        mnist = _mnist(root / "mnist" / "mnist.npz", split)
        paths[split] = _generate(spec, name, split, seed, out, mnist, chunk, log)
    return paths
