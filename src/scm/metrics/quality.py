"""Quality of generated images against a reference: feature spaces, cached reference statistics, measurement.

Two feature spaces:
- "classifier:<key>" — the penultimate layer of a small classifier trained on the data set (offline; reported
  as FD-<KEY>, e.g. FD-MNIST, never as FID). Its class probabilities also say how recognisable samples are.
- "inception" — the FID Inception-v3 network (needs the local weights file): reported as FID.

Reference statistics (mean, covariance and a feature sample for KID / precision / recall) are computed once
per data set and feature space, a chunk of images at a time (so a memory-mapped prepared data set of any size
fits), and cached as .npz under <data dir>/refs/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scm._checks import describe_shape
from scm._stats import merge_moments
from scm.data import ImageData, PreparedData, load_dataset
from scm.data.builtin import data_dir
from scm.errors import DataError
from scm.files import atomic_write
from scm.metrics.classifier import Classifier, get_classifier
from scm.metrics.distances import feature_stats, frechet_distance, kernel_distance, precision_recall

__all__ = ["FeatureSpace", "RefStats", "measure", "open_reference", "reference_stats"]

SAMPLE = 10_000  # features kept for KID and precision/recall
EMBED_CHUNK = 5000  # images embedded at a time: a multiple of both embedding batches (500, 250)


@dataclass
class FeatureSpace:
    key: str                         # "classifier:mnist" | "inception"
    classifier: Classifier | None = None
    inception: torch.nn.Module | None = None

    @property
    def metric(self) -> str:
        return "FID" if self.key == "inception" else f"FD-{self.key.split(':', 1)[1].upper()}"

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.classifier is not None:
            return self.classifier.embed(images, batch)
        feats = [self.inception.features(images[i: i + batch]) for i in range(0, len(images), batch)]
        return torch.cat(feats), None


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    sample: np.ndarray
    space: str
    shape: tuple[int, ...]       # the images', (C, H, W)
    source: str
    count: int

    def save(self, path: Path) -> None:
        meta = json.dumps({"space": self.space, "shape": list(self.shape), "source": self.source, "count": self.count})
        atomic_write(path, lambda tmp: np.savez(tmp, mu=self.mu, sigma=self.sigma, sample=self.sample,
                                                meta=np.array(meta)))

    @classmethod
    def load(cls, path: Path) -> RefStats:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if "shape" not in meta:  # written before shapes were tuples: square images
                    r, c = meta.pop("resolution"), meta.pop("channels")
                    meta["shape"] = (c, r, r)
                meta["shape"] = tuple(int(v) for v in meta["shape"])
                return cls(z["mu"], z["sigma"], z["sample"], **meta)
        except Exception as e:  # BadZipFile, OSError, KeyError, ValueError …
            raise DataError(f"{path}: not a scm reference-statistics file ({type(e).__name__}: {e})") from None


def _space(key: str, train: ImageData | PreparedData | None = None, test: ImageData | PreparedData | None = None,
           inception_path=None, log=print):
    if key == "inception":
        from scm.metrics.inception import load_inception

        return FeatureSpace(key, inception=load_inception(inception_path))
    name = key.split(":", 1)[1]
    model, _info = get_classifier(name, train, test, log=log)
    return FeatureSpace(key, classifier=model)


METRICS = ("fd", "fid")


def open_reference(ref: str, metric: str = "fd", inception_path=None, log=print) -> tuple[FeatureSpace, RefStats]:
    """`ref` is a data set ('mnist', a folder, …) or a reference-statistics .npz; metric 'fd' (classifier) or 'fid'."""
    if metric not in METRICS:
        raise DataError(f"metric={metric!r}: use fd (a classifier's features) or fid (Inception)", key="metric")
    if str(ref).endswith(".npz") and Path(ref).is_file() and not _is_image_npz(Path(ref)):
        stats = RefStats.load(Path(ref))
        return _space(stats.space, inception_path=inception_path, log=log), stats
    name = _images_of(str(ref))
    base, _, split = name.partition(":")
    data_key = base if base in ("mnist",) else Path(base).stem
    key = "inception" if metric == "fid" else f"classifier:{data_key}"
    train = load_dataset(name)
    test = None
    if key != "inception":
        if train.labels is None:
            raise DataError(f"{train.source}: FD-<dataset> needs labels to train its classifier; measure FID instead",
                            key="metric")
        test = _test_split(name, train)
    space = _space(key, train, test, inception_path, log)
    cache = data_dir() / "refs" / f"{key.replace(':', '-')}-{data_key}{'-' + split if split == 'test' else ''}.npz"
    if cache.is_file():
        return space, RefStats.load(cache)
    log(f"computing reference statistics of {train.source} in {space.metric} features ...")
    stats = reference_stats(space, train)
    stats.save(cache)
    return space, stats


def _images_of(ref: str) -> str:
    """The image data set of a reference: a captioned built-in set's images are its base set's ("mnist-captions:test"
    is measured as "mnist:test", with the MNIST classifier and statistics)."""
    base, colon, split = ref.partition(":")
    return f"mnist{colon}{split}" if base == "mnist-captions" else ref


def reference_stats(space: FeatureSpace, data, chunk: int = EMBED_CHUNK) -> RefStats:
    """Mean, covariance and a random sample (SAMPLE features, seed 0) of a data set's features, embedded
    `chunk` images at a time (`data.batch`), so that memory does not grow with the data set. The features,
    their order and the sample are those of embedding the whole set at once (`chunk` is a multiple of the
    embedding batch); mean and covariance are merged per chunk in float64."""
    n = len(data)
    if n < 2:
        raise DataError(f"{data.source}: reference statistics need at least 2 images, got {n}")
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:SAMPLE]
    slot = torch.full((n,), -1, dtype=torch.int64)
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
        here = slot[index]
        sample[here[here >= 0]] = feats[here >= 0]
    count, mu, scatter = summary
    return RefStats(mu.numpy(), (scatter / (count - 1)).numpy(), sample.numpy(), space.key, data.shape, data.source, n)


def _is_image_npz(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "meta" not in z.files
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError …: the file is not a readable .npz
        raise DataError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from None


def _test_split(name: str, train: ImageData | PreparedData) -> ImageData | PreparedData:
    """The data set's test split (MNIST's, an IDX or CIFAR folder's), else its last 10 % (a view: not copied)."""
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


def measure(images: torch.Tensor, space: FeatureSpace, ref: RefStats, seed: int = 0) -> dict:
    """The metric (FD/FID), KID, precision, recall and, with a classifier, recognisability of `images`."""
    if tuple(images.shape[1:]) != ref.shape:
        raise DataError(f"reference statistics are for {describe_shape(ref.shape)} images ({ref.source}), but the "
                        f"samples are {describe_shape(tuple(images.shape[1:]))}")
    feats, probs = space.embed(images)
    mu, sigma = feature_stats(feats)
    sample = torch.from_numpy(ref.sample)
    g = torch.Generator().manual_seed(seed)
    k = min(1000, len(feats) // 2, len(sample)) if len(feats) >= 4 else 2
    out = {
        space.metric: frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "KID": kernel_distance(sample, feats, subsets=10, subset_size=k, generator=g),
    }
    p, r = precision_recall(sample[: min(len(sample), 5000)], feats[:5000])
    out.update(precision=p, recall=r, n=len(images))
    if probs is not None:
        conf, label = probs.max(1)
        out["confident"] = float((conf >= 0.9).float().mean())
        out["classes"] = int(label[conf >= 0.9].unique().numel())
    return out
