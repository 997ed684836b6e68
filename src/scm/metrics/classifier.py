"""Small classifiers trained on a data set's training split: the feature spaces of the offline quality metrics
("FD-<dataset>", never called FID, FVD or FAD) and the judges of recognisability and class accuracy.

One architecture per modality, one training routine and one cache for all:
- images [N, C, H, W]: `Classifier`, 2-D convolutions (MNIST: a couple of CPU minutes, ~99 % test accuracy);
- video [N, C, T, H, W]: `VideoClassifier`, 3-D convolutions over the whole clip (moving-mnist-tiny's digit
  labels). Its features give "FD-MovingMNIST": a Fréchet distance in a small classifier's clip features, NOT FVD
  (FVD needs the Kinetics-trained I3D network, whose weights are not available offline), so its values are
  comparable only with themselves;
- audio [N, C, L]: `AudioClassifier`, a log-mel spectrogram (computed with torch.stft) under the image network
  (spoken-digits). Its features give "FD-SpokenDigits", not FAD (which needs VGGish weights).

Each is trained once per data set and cached as safetensors + JSON under <data dir>/classifiers/<key>; the
JSON records the modality, the item shape and the classifier's own test accuracy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scm.data.builtin import data_dir
from scm.data.modality import MODALITIES, modality_of
from scm.errors import CheckpointError, DataError
from scm.files import atomic_write_json
from scm.integrity import read_header, read_tensors, write_tensors

__all__ = ["EPOCHS", "AudioClassifier", "Classifier", "FeatureClassifier", "VideoClassifier", "build_classifier",
           "get_classifier", "save_classifier", "train_classifier"]

FEATURES = 128  # the width of every classifier's feature layer (the FD space)
EPOCHS = {"image": 4, "video": 1, "audio": 4}  # measured: benchmarks/results/av_classifiers.md
# batch sizes: clips train far better per CPU second in small batches (moving-mnist-tiny, 3,000 clips, one
# epoch: 36 % test accuracy at 128, 87 % at 32, in about the same time)
BATCH = {"image": 128, "video": 32, "audio": 32}
SHIFT = {"image": 2, "video": 2, "audio": 1600}  # the largest random shift of training augmentation (pixels, samples)


class FeatureClassifier(nn.Module):
    """What every classifier here shares: `features` (subclasses) → [N, FEATURES], a linear head `fc2` to
    logits, and `embed`, which gives features and class probabilities of items in [-1, 1] a batch at a time."""

    modality = "image"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))

    def check_items(self, x: torch.Tensor, what: str = "items") -> None:
        """DataError naming `what` when `x` is not a batch of this classifier's modality and channels."""
        ndim = MODALITIES[self.modality] + 1
        if x.ndim != ndim or x.shape[1] != self.channels:
            raise DataError(f"{what}: shape {list(x.shape)}; this {self.modality} classifier takes "
                            f"[N, {self.channels}, …] batches of {ndim} dimensions")

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, FEATURES], class probabilities [N, K]) for items in [-1, 1]."""
        self.check_items(x)
        self.eval()
        feats, probs = [], []
        for i in range(0, len(x), batch):
            f = self.features(x[i: i + batch].float())
            feats.append(f)
            probs.append(torch.softmax(self.fc2(f), dim=1))
        return torch.cat(feats), torch.cat(probs)


class Classifier(FeatureClassifier):
    """Images: conv(16)-pool-conv(32)-pool-conv(64)-pool(3×3) → 128-d features → logits. Inputs in [-1, 1];
    ~2M multiply-adds per 28×28 image, so it trains in a few CPU minutes."""

    def __init__(self, channels: int, num_classes: int, shape: tuple[int, ...] | None = None):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.c1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 9, FEATURES)
        self.fc2 = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        h = F.adaptive_avg_pool2d(F.relu(self.c3(h)), 3)
        return F.relu(self.fc1(h.flatten(1)))


class VideoClassifier(FeatureClassifier):
    """Clips [N, C, T, H, W]: conv3d(16, 1×3×3)-pool(1×2×2)-conv3d(32, 3×3×3)-pool(2×2×2)-conv3d(64, 3×3×3)
    -global max pool → 128-d features → logits, each convolution batch-normalised. The first layer is spatial
    only (a frame's strokes), the next two see motion over 3 frames; the global max pool makes the features
    independent of where the digit is (a 3×3 average pool, as for centred images, learnt a third as fast:
    33 % against 96 % test accuracy after one epoch). ~45M multiply-adds per 8×32×32 clip. Not I3D: its
    features are not FVD's."""

    modality = "video"

    def __init__(self, channels: int, num_classes: int, shape: tuple[int, ...] | None = None):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.c1 = nn.Conv3d(channels, 16, (1, 3, 3), padding=(0, 1, 1))
        self.c2 = nn.Conv3d(16, 32, 3, padding=1)
        self.c3 = nn.Conv3d(32, 64, 3, padding=1)
        self.n1, self.n2, self.n3 = nn.BatchNorm3d(16), nn.BatchNorm3d(32), nn.BatchNorm3d(64)
        self.fc1 = nn.Linear(64, FEATURES)
        self.fc2 = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool3d(F.relu(self.n1(self.c1(x))), (1, 2, 2))
        h = F.max_pool3d(F.relu(self.n2(self.c2(h))), 2, ceil_mode=True)  # ceil: an odd length keeps its last frame
        h = F.adaptive_max_pool3d(F.relu(self.n3(self.c3(h))), 1)
        return F.relu(self.fc1(h.flatten(1)))


def mel_filters(n_fft: int, bands: int, sample_rate: int) -> torch.Tensor:
    """Triangular filters [bands, n_fft // 2 + 1] spaced evenly on the mel scale (HTK's 2595·log10(1 + f/700))
    from 0 Hz to the Nyquist frequency, each peaking at 1."""
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    edges_mel = torch.linspace(0, mel(sample_rate / 2), bands + 2, dtype=torch.float64)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise, fall = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    return rise.minimum(fall).clamp(min=0).float()


class AudioClassifier(Classifier):
    """Waveforms [N, C, L] at `sample_rate`: a log-mel spectrogram (25 ms Hann windows every 10 ms, 64 mel bands,
    log(power + 1e-6)), normalised by a batch norm (its running statistics: the training set's level, so that
    loudness still counts in the features), under the image network. One second at 16 kHz is a 64×101 "image":
    ~16M multiply-adds a clip. Measured against five strided 1-D convolutions on the raw waveform
    (benchmarks/av_classifiers.py, spoken-digits, 4 epochs): 99.6 % vs 100 % test accuracy, i.e. 2 of 500 clips,
    a tie; the log-mel front end is kept because its features are those of a spectrum (what FAD-like audio metrics
    compare), not of a waveform's phase.
    """

    modality = "audio"

    def __init__(self, channels: int, num_classes: int, shape: tuple[int, ...] | None = None,
                 sample_rate: int = 16_000, bands: int = 64):
        super().__init__(channels, num_classes)
        self.n_fft, self.hop = round(0.025 * sample_rate), round(0.010 * sample_rate)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("mel", mel_filters(self.n_fft, bands, sample_rate), persistent=False)
        self.norm = nn.BatchNorm2d(channels)

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, L] → [N, C, bands, frames]."""
        n, c, length = x.shape
        spec = torch.stft(x.reshape(n * c, length), self.n_fft, self.hop, window=self.window, return_complex=True)
        power = self.mel @ spec.abs().square()
        return torch.log(power + 1e-6).reshape(n, c, *power.shape[1:])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return super().features(self.norm(self.log_mel(x)))


ARCHITECTURES = {"image": Classifier, "video": VideoClassifier, "audio": AudioClassifier}


def build_classifier(shape: tuple[int, ...], num_classes: int, media: dict | None = None) -> FeatureClassifier:
    """A fresh classifier for items of `shape` (its modality picks the architecture; audio takes its
    sample_rate from `media`)."""
    modality = modality_of(tuple(shape), "classifier")
    extra = {"sample_rate": int(media["sample_rate"])} if modality == "audio" and media else {}
    return ARCHITECTURES[modality](shape[0], num_classes, tuple(shape), **extra)


def _augment(x: torch.Tensor, modality: str, g: torch.Generator) -> torch.Tensor:
    """A random circular shift of the last (audio: time) or last two (image, video: space) dimensions, so that
    slightly misplaced generated items are judged fairly."""
    s = SHIFT[modality]
    dims = (-1,) if modality == "audio" else (-2, -1)
    shifts = tuple(int(v) for v in torch.randint(-s, s + 1, (len(dims),), generator=g))
    return torch.roll(x, shifts=shifts, dims=dims)


def accuracy_on(model: FeatureClassifier, test, chunk: int = 2000) -> float:
    """The share of `test` items whose most probable class is their label, a chunk at a time (the split may be
    memory-mapped and large)."""
    correct = 0
    for i in range(0, len(test), chunk):
        x, cond = test.batch(torch.arange(i, min(i + chunk, len(test))))
        correct += int((model.embed(x)[1].argmax(1) == cond["labels"]).sum())
    return correct / len(test)


def train_classifier(train, test, epochs: int | None = None, batch: int | None = None, seed: int = 0,
                     log=print, model: FeatureClassifier | None = None) -> tuple[FeatureClassifier, dict]:
    """Adam with a one-cycle learning rate and light augmentation (`_augment`) on a labelled data set of any
    modality (`epochs`: the modality's EPOCHS by default). Returns the classifier and its info (test accuracy,
    seconds, shape, modality …)."""
    if train.labels is None or test.labels is None:
        raise DataError(f"{train.source}: a classifier needs labelled data (this set has no labels)")
    if tuple(test.shape) != tuple(train.shape):
        raise DataError(f"{test.source}: items of shape {list(test.shape)}, the training split's are "
                        f"{list(train.shape)}")
    modality = modality_of(tuple(train.shape), train.source)
    epochs = EPOCHS[modality] if epochs is None else epochs
    batch = BATCH[modality] if batch is None else batch
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    media = getattr(train, "media", None)
    if model is None:
        model = build_classifier(train.shape, max(train.num_classes, test.num_classes), media)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch = min(batch, len(train))
    per_epoch = max(1, len(train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=epochs * per_epoch)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(per_epoch):
            x, cond = train.batch(perm[i * batch: (i + 1) * batch])
            loss = F.cross_entropy(model(_augment(x, modality, g)), cond["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    acc = accuracy_on(model, test)
    info = {"test_accuracy": acc, "test_count": len(test), "train_source": train.source,
            "test_source": test.source, "epochs": epochs, "batch": batch, "seconds": train_seconds,
            "modality": modality, "channels": train.channels, "shape": list(train.shape),
            "num_classes": model.num_classes,
            "media": media or {}}
    log(f"classifier: {100 * acc:.2f} % test accuracy after {train_seconds:.0f} s")
    return model.eval(), info


def _paths(key: str, root: Path | None) -> tuple[Path, Path]:
    base = (data_dir() if root is None else root) / "classifiers"
    return base / f"{key}.safetensors", base / f"{key}.json"


def _load_cached(weights: Path, meta: Path) -> tuple[FeatureClassifier, dict]:
    """The classifier cached at weights/meta (verified: `scm.integrity`); an info without "shape" or "modality"
    was written before video and audio: an image classifier."""
    info = json.loads(meta.read_text())
    shape = info.get("shape") or [info["channels"], 28, 28]
    model = build_classifier(tuple(shape), info["num_classes"], info.get("media"))
    expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_tensors(weights, expect=expect)
    model.load_state_dict(state)
    if read_header(weights).digest is None:  # cached by an scm before digests: warned once, then recorded
        write_tensors(state, weights)
    return model.eval(), info


def get_classifier(key: str, train=None, test=None, root: Path | None = None, epochs: int | None = None,
                   log=print) -> tuple[FeatureClassifier, dict]:
    """The cached classifier for `key` (e.g. "mnist", "moving-mnist-tiny", "spoken-digits"), trained from
    train/test first if there is none (or the cached one is damaged: named in the log, or in the DataError when
    there is nothing to train it from)."""
    weights, meta = _paths(key, root)
    if weights.is_file() and meta.is_file():
        try:
            return _load_cached(weights, meta)
        except (CheckpointError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
                DataError) as e:
            if train is None or test is None:
                raise DataError(f"{weights}: damaged cached classifier ({e}); delete it to train it again") from None
            log(f"{weights}: damaged cached classifier ({e}); training it again")
    if train is None or test is None:
        raise FileNotFoundError(f"no cached classifier {weights}; it is trained from the data set on first use")
    model, info = train_classifier(train, test, epochs=epochs, log=log)
    save_classifier(model, info, key, root)
    return model, info


def save_classifier(model: FeatureClassifier, info: dict, key: str, root: Path | None = None) -> Path:
    """Cache a trained classifier as `key` (what `get_classifier` reads); returns the weights' path."""
    weights, meta = _paths(key, root)
    write_tensors(model.state_dict(), weights)
    atomic_write_json(meta, info)  # last: a cached classifier is one with both files
    return weights
