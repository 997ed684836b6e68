"""Quality of generated images, video and audio against a reference: feature spaces, cached reference
statistics, measurement. The reference data set's modality picks the space (`open_reference`).

Feature spaces (`FeatureSpace.key`):
- "classifier:<key>" — the penultimate layer of a small classifier trained on the data set (`scm.metrics.
  classifier`; offline): images (FD-MNIST …), labelled video (FD-MovingMNIST for moving-mnist-tiny: a 3-D conv
  classifier's clip features, NOT FVD) and labelled audio (FD-SpokenDigits, not FAD). Its class probabilities
  also say how recognisable samples are and, given the classes asked for, their class accuracy.
- "frames:mnist" — grey digit video frame by frame in the MNIST classifier's features (`scm.metrics.frames`):
  FD-MNIST-frames. Measured beside a labelled grey video set's clip classifier (with temporal consistency), and
  alone for an unlabelled one such as the two-digit moving-mnist (no clip label to train a classifier on, and
  two digits a frame have no single per-frame digit: temporal consistency is not reported there).
- "inception" — the FID Inception-v3 network (needs the local weights file): reported as FID; images only.

Reference statistics (mean, covariance and a feature sample for KID / precision / recall; for video with a
per-frame space, that space's too) are computed once per data set and feature space, a chunk of items at a time
(so a memory-mapped prepared data set of any size fits), and cached as .npz under <data dir>/refs/.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scm._checks import describe_shape
from scm._stats import merge_moments
from scm.data import load_dataset
from scm.data.builtin import data_dir
from scm.data.modality import modality_of
from scm.errors import DataError
from scm.files import atomic_write
from scm.metrics.classifier import FeatureClassifier, get_classifier
from scm.metrics.distances import feature_stats, frechet_distance, kernel_distance, precision_recall
from scm.metrics.frames import mnist_frames, temporal_consistency

__all__ = ["FeatureSpace", "RefStats", "measure", "open_reference", "reference_stats"]

SAMPLE = 10_000  # features kept for KID and precision/recall
EMBED_CHUNK = 5000  # images embedded at a time: a multiple of both embedding batches (500, 250)
CHUNK_VALUES = EMBED_CHUNK * 28 * 28  # larger items (clips, audio) are embedded in chunks of about as many values
# how the metric names spell the built-in data sets (any other key is upper-cased: FD-<KEY>)
DISPLAY = {"mnist": "MNIST", "moving-mnist-tiny": "MovingMNIST", "spoken-digits": "SpokenDigits"}


@dataclass
class FeatureSpace:
    key: str                         # "classifier:<data key>" | "frames:mnist" | "inception"
    classifier: FeatureClassifier | None = None
    inception: torch.nn.Module | None = None
    frames: FeatureSpace | None = None  # labelled grey video: the per-frame MNIST space, measured beside this one

    @property
    def metric(self) -> str:
        """The name of the Fréchet distance in this space: FID, FD-<DATASET> or FD-MNIST-frames (never FVD/FAD)."""
        if self.key == "inception":
            return "FID"
        kind, name = self.key.split(":", 1)
        return f"FD-{DISPLAY.get(name, name.upper())}" + ("-frames" if kind == "frames" else "")

    @property
    def per_item(self) -> bool:
        """Whether `embed` gives one feature row per item (not per frame)."""
        return not self.key.startswith("frames:")

    @torch.no_grad()
    def embed(self, items: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, class probabilities or None): a row per item, or per frame (frame t of clip n at row
        n·T + t) in a "frames:" space."""
        if self.classifier is not None:
            return self.classifier.embed(items if self.per_item else mnist_frames(items), batch)
        if items.ndim != 4:
            raise DataError(f"items: shape {list(items.shape)}; FID's Inception network takes images [N, C, H, W]")
        feats = [self.inception.features(items[i: i + batch]) for i in range(0, len(items), batch)]
        return torch.cat(feats), None


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    sample: np.ndarray
    space: str
    shape: tuple[int, ...]       # the items', channels first: (C, H, W), (C, T, H, W) or (C, L)
    source: str
    count: int
    frames: RefStats | None = None  # the per-frame space's statistics of the same clips (FeatureSpace.frames)

    def _arrays(self, prefix: str = "") -> dict:
        meta = {"space": self.space, "shape": list(self.shape), "source": self.source, "count": self.count}
        out = {f"{prefix}mu": self.mu, f"{prefix}sigma": self.sigma, f"{prefix}sample": self.sample,
               f"{prefix}meta": np.array(json.dumps(meta))}
        return out | (self.frames._arrays("frames_") if self.frames is not None else {})

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: np.savez(tmp, **self._arrays()))

    @classmethod
    def _read(cls, z, prefix: str = "") -> RefStats:
        meta = json.loads(str(z[f"{prefix}meta"]))
        if "shape" not in meta:  # written before shapes were tuples: square images
            r, c = meta.pop("resolution"), meta.pop("channels")
            meta["shape"] = (c, r, r)
        meta["shape"] = tuple(int(v) for v in meta["shape"])
        frames = cls._read(z, "frames_") if not prefix and "frames_meta" in z.files else None
        return cls(z[f"{prefix}mu"], z[f"{prefix}sigma"], z[f"{prefix}sample"], **meta, frames=frames)

    @classmethod
    def load(cls, path: Path) -> RefStats:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls._read(z)
        except Exception as e:  # BadZipFile, OSError, KeyError, ValueError …
            raise DataError(f"{path}: not a scm reference-statistics file ({type(e).__name__}: {e})") from None


def _classifier_key(name: str) -> str:
    """The key of a data set's classifier: the built-in set's name ("mnist", "moving-mnist-tiny", …) or a
    path's stem; the split does not matter (a classifier is always trained on the training split)."""
    base = name.partition(":")[0]
    return base if base == "mnist" or base.startswith(("moving-mnist", "spoken-digits")) else Path(base).stem


def _space(key: str, train=None, test=None, inception_path=None, log=print) -> FeatureSpace:
    """The feature space `key` (its classifier loaded from the cache, or trained from train/test first)."""
    if key == "inception":
        from scm.metrics.inception import load_inception

        return FeatureSpace(key, inception=load_inception(inception_path))
    kind, name = key.split(":", 1)
    if kind == "frames":
        return FeatureSpace(key, classifier=_mnist_classifier(log))
    model, _info = get_classifier(name, train, test, log=log)
    return FeatureSpace(key, classifier=model)


def _mnist_classifier(log) -> FeatureClassifier:
    try:
        return get_classifier("mnist", log=log)[0]
    except FileNotFoundError:
        return get_classifier("mnist", load_dataset("mnist"), load_dataset("mnist:test"), log=log)[0]


def _space_of(name: str, data, metric: str, inception_path, log) -> FeatureSpace:
    """The feature space a reference data set is measured in, by its modality (module docstring)."""
    modality = data.modality
    if metric == "fid":
        if modality != "image":
            raise DataError(f"{data.source}: {modality}; FID (Inception) measures images, {modality} is measured "
                            "in a classifier's features (metric fd)", key="metric")
        return _space("inception", inception_path=inception_path, log=log)
    grey_video = modality == "video" and data.shape[0] == 1
    if data.labels is None:
        if grey_video:  # e.g. the two-digit moving-mnist: only its frames can be judged (by the MNIST classifier)
            return _space("frames:mnist", log=log)
        raise DataError(f"{data.source}: FD-<dataset> needs labels to train its classifier"
                        + ("; measure FID instead" if modality == "image" else f" (unlabelled {modality})"),
                        key="metric")
    train, test = _classifier_splits(name, data)
    space = _space(f"classifier:{_classifier_key(name)}", train, test, log=log)
    if grey_video:
        space.frames = _space("frames:mnist", log=log)
    return space


METRICS = ("fd", "fid")


def open_reference(ref: str, metric: str = "fd", inception_path=None, log=print) -> tuple[FeatureSpace, RefStats]:
    """`ref` is a data set ('mnist', 'moving-mnist-tiny:test', 'spoken-digits', a folder, …) or a
    reference-statistics .npz; metric 'fd' (a classifier's features, for any modality) or 'fid' (images)."""
    if metric not in METRICS:
        raise DataError(f"metric={metric!r}: use fd (a classifier's features) or fid (Inception)", key="metric")
    if str(ref).endswith(".npz") and Path(ref).is_file() and not _is_image_npz(Path(ref)):
        stats = RefStats.load(Path(ref))
        space = _space(stats.space, inception_path=inception_path, log=log)
        if stats.frames is not None:
            space.frames = _space(stats.frames.space, log=log)
        return space, stats
    name = _images_of(str(ref))
    base, _, split = name.partition(":")
    data = load_dataset(name)
    space = _space_of(name, data, metric, inception_path, log)
    data_key = base if base == "mnist" else Path(base).stem
    suffix = "-test" if split == "test" else ""
    cache = data_dir() / "refs" / f"{space.key.replace(':', '-')}-{data_key}{suffix}.npz"
    if cache.is_file():
        return space, RefStats.load(cache)
    log(f"computing reference statistics of {data.source} in {space.metric} features ...")
    stats = reference_stats(space, data)
    if space.frames is not None:
        stats.frames = reference_stats(space.frames, data)
    stats.save(cache)
    return space, stats


def _images_of(ref: str) -> str:
    """The data set of a reference: a captioned built-in set's images are its base set's ("mnist-captions:test"
    is measured as "mnist:test", with the MNIST classifier and statistics)."""
    base, colon, split = ref.partition(":")
    return f"mnist{colon}{split}" if base == "mnist-captions" else ref


def _chunk_items(shape: tuple[int, ...]) -> int:
    """Items embedded at a time: EMBED_CHUNK images of MNIST's size, fewer (a multiple of 500) of larger items."""
    fit = CHUNK_VALUES // math.prod(shape)
    return EMBED_CHUNK if fit >= EMBED_CHUNK else max(500, fit // 500 * 500)


def reference_stats(space: FeatureSpace, data, chunk: int | None = None) -> RefStats:
    """Mean, covariance and a random sample (SAMPLE feature rows, seed 0) of a data set's features (a row per
    item, or per frame in a "frames:" space), embedded `chunk` items at a time (`data.batch`; default
    `_chunk_items`), so that memory does not grow with the data set. The features, their order and the sample
    are those of embedding the whole set at once (`chunk` is a multiple of the embedding batch); mean and
    covariance are merged per chunk in float64."""
    n = len(data)
    if n < 2:
        raise DataError(f"{data.source}: reference statistics need at least 2 items, got {n}")
    chunk = chunk or _chunk_items(data.shape)
    per_item = 1 if space.per_item else data.shape[1]  # frames: T feature rows an item
    rows = n * per_item
    pick = torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:SAMPLE]
    slot = torch.full((rows,), -1, dtype=torch.int64)
    slot[pick] = torch.arange(len(pick))
    summary, sample = None, None
    for start in range(0, n, chunk):
        index = torch.arange(start, min(start + chunk, n))
        feats, _ = space.embed(data.batch(index)[0])
        f = feats.double()
        mean = f.mean(0)
        summary = merge_moments(summary, (len(f), mean, (f - mean).T @ (f - mean)))
        if sample is None:
            sample = torch.empty(len(pick), feats.shape[1], dtype=feats.dtype)
        here = slot[start * per_item: start * per_item + len(feats)]
        sample[here[here >= 0]] = feats[here >= 0]
    count, mu, scatter = summary
    return RefStats(mu.numpy(), (scatter / (count - 1)).numpy(), sample.numpy(), space.key, tuple(data.shape),
                    data.source, n)


def _is_image_npz(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "meta" not in z.files
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError …: the file is not a readable .npz
        raise DataError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from None


def _classifier_splits(name: str, data):
    """(train, test) a data set's classifier is trained on: the training split (also for a ":test" reference)
    and the test split (`_test_split`)."""
    base, _, split = name.partition(":")
    train = load_dataset(base) if split == "test" else data
    return train, _test_split(base, train)


def _test_split(name: str, train):
    """The data set's test split (MNIST's, a built-in or IDX or CIFAR folder's), else its last 10 % (a view)."""
    if name in ("mnist", "mnist:train"):
        return load_dataset("mnist:test")
    try:
        test = load_dataset(f"{name}:test")
        if test.source != train.source:  # a folder, .npz or prepared directory has no ":test": the same data
            return test
    except DataError:
        pass
    n = max(1, len(train) // 10)
    return train.subset(len(train) - n, None, train.source + " (last 10 %)")


def _check_items(items: torch.Tensor, ref: RefStats) -> None:
    shape = tuple(items.shape[1:])
    if shape == ref.shape:
        return
    what = {"image": "images", "video": "video clips", "audio": "audio clips"}
    ref_kind = what[modality_of(ref.shape, ref.source)]
    try:
        kind = what[modality_of(shape, "samples")]
    except DataError:
        kind = "items"
    raise DataError(f"reference statistics are for {describe_shape(ref.shape)} {ref_kind} ({ref.source}), but "
                    f"the samples are {describe_shape(shape)} {kind}")


def _distances(feats: torch.Tensor, space: FeatureSpace, ref: RefStats, seed: int) -> dict:
    """The Fréchet distance, KID, precision and recall of features against the reference's."""
    mu, sigma = feature_stats(feats)
    sample = torch.from_numpy(ref.sample)
    g = torch.Generator().manual_seed(seed)
    k = min(1000, len(feats) // 2, len(sample)) if len(feats) >= 4 else 2
    p, r = precision_recall(sample[: min(len(sample), 5000)], feats[:5000])
    return {space.metric: frechet_distance(mu, sigma, ref.mu, ref.sigma),
            "KID": kernel_distance(sample, feats, subsets=10, subset_size=k, generator=g), "precision": p, "recall": r}


def measure(items: torch.Tensor, space: FeatureSpace, ref: RefStats, seed: int = 0,
            labels: torch.Tensor | None = None) -> dict:
    """The metric (FD/FID), KID, precision, recall and, with a classifier, recognisability of `items` (images,
    clips or audio, of the reference's shape); with `labels` (the class each sample was asked for) its class
    "accuracy"; for grey video with a per-frame space also FD-MNIST-frames, "temporal_consistency" and
    "frame_agreement" (`scm.metrics.frames`)."""
    _check_items(items, ref)
    feats, probs = space.embed(items)
    out = _distances(feats, space, ref, seed) | {"n": len(items)}
    if probs is not None and space.per_item:
        conf, label = probs.max(1)
        out["confident"] = float((conf >= 0.9).float().mean())
        out["classes"] = int(label[conf >= 0.9].unique().numel())
        if labels is not None:
            if labels.shape != (len(items),):
                raise DataError(f"labels: shape {list(labels.shape)}; need one class per sample ({len(items)})")
            out["accuracy"] = float((label == labels.to(label.device)).float().mean())
    if space.frames is not None and ref.frames is not None:
        frame_feats, frame_probs = space.frames.embed(items)
        out[space.frames.metric] = frechet_distance(*feature_stats(frame_feats), ref.frames.mu, ref.frames.sigma)
        out |= temporal_consistency(frame_probs, items.shape[2])
    return out
