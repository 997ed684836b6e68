"""The classifiers of the offline video and audio metrics, trained in full on this machine's CPU: test
accuracy and training time (`scm.metrics.classifier`), and the figures around them.

    python benchmarks/av_classifiers.py [--no-cache] [--threads 2]

- video: `VideoClassifier` on moving-mnist-tiny (20,000 train clips, its default epochs and batch), accuracy on
  the 2,000 test clips; FD-MovingMNIST is measured in its features (not FVD);
- audio: `AudioClassifier` (log-mel front end) on spoken-digits (3,000 train clips), accuracy on the 500 test
  clips; and, for the choice of front end, a 1-D convolution network on the raw waveform (`WaveformNet`, here
  only) trained the same way;
- per-frame: the cached MNIST classifier's accuracy on moving-mnist-tiny's test frames seen as MNIST digits
  (`scm.metrics.frames.mnist_frames`) and the temporal consistency of the real test clips.
Needs the generated sets (`scm data fetch moving-mnist-tiny`, `scm data fetch spoken-digits`) and the cached
MNIST classifier. The trained video and audio classifiers are cached under <data dir>/classifiers/ (as
`get_classifier` would) unless --no-cache. Writes benchmarks/results/av_classifiers.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from common import write_results
from torch import nn

from scm.app.report import Report
from scm.data import load_dataset
from scm.metrics.classifier import FEATURES, FeatureClassifier, get_classifier, save_classifier, train_classifier
from scm.metrics.frames import mnist_frames, temporal_consistency


class WaveformNet(FeatureClassifier):
    """The alternative front end: five strided 1-D convolutions on the waveform (stride 4 each: 16,000 samples →
    16 positions of 1,024-sample receptive field), global max pool → 128-d features."""

    modality = "audio"

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        widths = [channels, 16, 32, 64, 64, 128]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, 9, stride=4, padding=4) for a, b in itertools.pairwise(widths))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:])
        self.fc1, self.fc2 = nn.Linear(128, FEATURES), nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.relu(norm(conv(x)))
        return F.relu(self.fc1(x.amax(-1)))


def _waveform_baseline(train, test, epochs: int) -> dict:
    torch.manual_seed(0)  # WaveformNet's initial weights, as train_classifier seeds its own network's
    net = WaveformNet(train.channels, train.num_classes)
    return train_classifier(train, test, epochs=epochs, log=lambda m: None, model=net)[1]


def _frames_figures(test) -> dict:
    mnist, _ = get_classifier("mnist")
    x, cond = test.batch(torch.arange(len(test)))
    _, probs = mnist.embed(mnist_frames(x))
    frames = x.shape[2]
    hits = probs.argmax(1).reshape(-1, frames) == cond["labels"][:, None]
    return {"frame_accuracy": float(hits.float().mean()), **temporal_consistency(probs, frames)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-cache", action="store_true", help="do not cache the trained classifiers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for key in ("moving-mnist-tiny", "spoken-digits"):
        train, test = load_dataset(key), load_dataset(f"{key}:test")
        model, info = train_classifier(train, test)
        if not args.no_cache:
            save_classifier(model, info, key)
        rows[key] = info
    audio = rows["spoken-digits"]
    rows["spoken-digits (waveform 1-D convs)"] = _waveform_baseline(
        load_dataset("spoken-digits"), load_dataset("spoken-digits:test"), audio["epochs"])
    frames = _frames_figures(load_dataset("moving-mnist-tiny:test"))
    report = Report("Classifiers of the offline video and audio metrics (CPU)")
    report.table(["classifier", "train clips", "epochs", "batch", "test accuracy", "training s"],
                 [[k, v["train_source"], v["epochs"], v["batch"], f"{100 * v['test_accuracy']:.2f} % of "
                   f"{v['test_count']}", f"{v['seconds']:.0f}"] for k, v in rows.items()])
    report.text(f"MNIST classifier on moving-mnist-tiny's test frames (upsampled ×2, 28×28 window at the centre "
                f"of mass): {100 * frames['frame_accuracy']:.2f} % per frame; real test clips' temporal "
                f"consistency {frames['temporal_consistency']:.4f}, frame agreement {frames['frame_agreement']:.4f}."
                " These are not FVD (no I3D weights offline).")
    paths = write_results("av_classifiers", {"classifiers": rows, "frames": frames}, report)
    print(*paths)


if __name__ == "__main__":
    main()
