"""A small classifier trained on a data set's training split: the feature space of the offline quality metric
("FD-<dataset>", never called FID) and the judge of recognisability in the demo.

Trained once per data set (a couple of CPU minutes for MNIST, ~99 % test accuracy) and cached as safetensors
+ JSON under <data dir>/classifiers/<key>.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scm.data import ImageData
from scm.data.builtin import data_dir
from scm.errors import CheckpointError, DataError
from scm.files import atomic_write_json
from scm.integrity import read_header, read_tensors, write_tensors

__all__ = ["Classifier", "get_classifier", "train_classifier"]


class Classifier(nn.Module):
    """conv(16)-pool-conv(32)-pool-conv(64)-pool(3×3) → 128-d features → logits. Inputs in [-1, 1]; ~2M
    multiply-adds per 28×28 image, so it trains in a few CPU minutes."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.c1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 9, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        h = F.adaptive_avg_pool2d(F.relu(self.c3(h)), 3)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, 128], class probabilities [N, K]) for images in [-1, 1]."""
        self.eval()
        feats, probs = [], []
        for i in range(0, len(x), batch):
            f = self.features(x[i: i + batch].float())
            feats.append(f)
            probs.append(torch.softmax(self.fc2(f), dim=1))
        return torch.cat(feats), torch.cat(probs)


def train_classifier(train: ImageData, test: ImageData, epochs: int = 4, batch: int = 128, seed: int = 0,
                     log=print) -> tuple[Classifier, dict]:
    """Adam, light augmentation (±2 px shifts) so that slightly imperfect generated digits are judged fairly."""
    if train.labels is None or test.labels is None:
        raise ValueError(f"{train.source}: a classifier needs labelled data")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier(train.channels, max(train.num_classes, test.num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch = min(batch, len(train))
    per_epoch = max(1, len(train) // batch)
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(per_epoch):
            x, cond = train.batch(perm[i * batch: (i + 1) * batch])
            y = cond["labels"]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    correct = 0
    for i in range(0, len(test), 5000):  # a chunk at a time: the test split may be memory-mapped and large
        x_test, cond = test.batch(torch.arange(i, min(i + 5000, len(test))))
        correct += int((model.embed(x_test)[1].argmax(1) == cond["labels"]).sum())
    acc = correct / len(test)
    info = {"test_accuracy": acc, "train_source": train.source, "epochs": epochs,
            "seconds": time.perf_counter() - start,
            "channels": train.channels, "shape": list(train.shape), "num_classes": model.num_classes}
    log(f"classifier: {100 * acc:.2f} % test accuracy after {info['seconds']:.0f} s")
    return model.eval(), info


def _paths(key: str, root: Path | None) -> tuple[Path, Path]:
    base = (data_dir() if root is None else root) / "classifiers"
    return base / f"{key}.safetensors", base / f"{key}.json"


def get_classifier(key: str, train: ImageData | None = None, test: ImageData | None = None, root: Path | None = None,
                   log=print) -> tuple[Classifier, dict]:
    """The cached classifier for `key` (e.g. "mnist"), trained from train/test first if there is none."""
    weights, meta = _paths(key, root)
    if weights.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            model = Classifier(info["channels"], info["num_classes"])
            expect = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            state = read_tensors(weights, expect=expect)  # verified (scm.integrity)
            model.load_state_dict(state)
            if read_header(weights).digest is None:  # cached by an scm before digests: warned once, then recorded
                write_tensors(state, weights)
            return model.eval(), info
        except (CheckpointError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            if train is None or test is None:
                raise DataError(f"{weights}: damaged cached classifier ({e}); delete it to train it again") from None
            log(f"{weights}: damaged cached classifier ({e}); training it again")
    if train is None or test is None:
        raise FileNotFoundError(f"no cached classifier {weights}; it is trained from the data set on first use")
    model, info = train_classifier(train, test, log=log)
    write_tensors(model.state_dict(), weights)
    atomic_write_json(meta, info)  # last: a cached classifier is one with both files
    return model, info
