"""Offline quality metrics of video and audio (`scm.metrics`): the clip and waveform classifiers on the real
generated sets, FD-MovingMNIST / FD-MNIST-frames / FD-SpokenDigits (none of them FVD or FAD), temporal
consistency, the cache and bad input.

Uses moving-mnist-tiny and spoken-digits from the machine's data directory when they are there, and generates
them into the session's otherwise (seeded, so the same bytes: ~3 s and ~30 s; spoken digits need espeak-ng,
which `make test` installs). The classifiers here are trained once per session on small budgets to keep the
tests fast (the full ones:
benchmarks/av_classifiers.py): video on 3,000 of the 20,000 training clips for one epoch, audio on all 3,000
clips for two epochs (the production default is EPOCHS), the MNIST classifier of the frames for one epoch
(conftest's `mnist_classifier`). All of them and the reference statistics live in the session's temporary data
directory, never in the user's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from scm.errors import DataError

SETS = ("moving-mnist-tiny", "spoken-digits")


def _cached_set(name: str) -> Path | None:
    for root in filter(None, [os.environ.get("SCM_DATA_DIR"), os.path.expanduser("~/.cache/scm")]):
        if (Path(root) / name / "test" / "meta.json").is_file() and (Path(root) / name / "train").is_dir():
            return Path(root) / name
    return None


@pytest.fixture(scope="session")
def av_dir(real_mnist, mnist_classifier):
    """The session's data directory (real MNIST and its one-epoch classifier) with the generated video and audio
    sets linked in, and their classifiers trained on small budgets (module docstring)."""
    from scm.data import load_dataset
    from scm.data.moving_mnist import fetch_moving_mnist
    from scm.data.spoken_digits import fetch_spoken_digits
    from scm.metrics.classifier import get_classifier

    generate = {"moving-mnist-tiny": lambda root: fetch_moving_mnist("moving-mnist-tiny", root, log=lambda m: None),
                "spoken-digits": lambda root: fetch_spoken_digits(root, log=lambda m: None)}
    for name in SETS:
        found, link = _cached_set(name), Path(real_mnist) / name
        if link.exists():
            continue
        if found is None:
            generate[name](Path(real_mnist))
        else:
            link.symlink_to(found, target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("SCM_DATA_DIR", real_mnist)
    quiet = dict(log=lambda m: None)
    infos = {}
    try:
        tiny = load_dataset("moving-mnist-tiny").subset(0, 3000)
        infos["video"] = get_classifier("moving-mnist-tiny", tiny, load_dataset("moving-mnist-tiny:test"),
                                        epochs=1, **quiet)[1]
        infos["audio"] = get_classifier("spoken-digits", load_dataset("spoken-digits"),
                                        load_dataset("spoken-digits:test"), epochs=2, **quiet)[1]
        yield Path(real_mnist), infos
    finally:
        mp.undo()


@pytest.fixture
def data_env(av_dir, monkeypatch):
    monkeypatch.setenv("SCM_DATA_DIR", str(av_dir[0]))
    return av_dir


def test_classifier_accuracy_on_the_real_sets(av_dir):
    """Measured with these budgets: video 88.8 % of the 2,000 test clips (the full classifier: 97.4 %,
    benchmarks/results/av_classifiers.md), audio 96.4 % of the 500 test clips (full: 99.6 %); thresholds ~10
    points lower, for other CPUs' arithmetic (training is seeded)."""
    video, audio = av_dir[1]["video"], av_dir[1]["audio"]
    assert video["modality"] == "video" and video["shape"] == [1, 8, 32, 32] and video["test_count"] == 2000
    assert video["test_accuracy"] > 0.75
    assert audio["modality"] == "audio" and audio["media"] == {"sample_rate": 16000} and audio["test_count"] == 500
    assert audio["test_accuracy"] > 0.85


def test_video_fd_real_vs_noise_and_temporal_consistency(data_env):
    """Real training clips against the test split's statistics: small FDs (clip space and per frame), every
    clip one digit over time and class accuracy near the classifier's; noise clips and clips whose frames are
    shuffled across clips: large FDs / low consistency. Measured: FD-MovingMNIST 1.1 real, 444 noise, 95
    shuffled (the 3-D features see the broken motion); FD-MNIST-frames 1.5 real and shuffled (the same frames),
    206 noise; temporal consistency 1.0 real, 0.0 shuffled (8 frames of random digits agree with chance 10⁻⁷);
    class accuracy 85 % real. (Noise clips score 0.8 consistency: one class for all noise, which is why the
    figure is read beside FD-MNIST-frames.)"""
    from scm.data import load_dataset
    from scm.metrics import measure, open_reference

    space, ref = open_reference("moving-mnist-tiny:test", log=lambda m: None)
    assert space.metric == "FD-MovingMNIST" and space.frames.metric == "FD-MNIST-frames"
    assert ref.shape == (1, 8, 32, 32) and ref.frames.shape == ref.shape and ref.frames.count == 2000
    x, cond = load_dataset("moving-mnist-tiny").batch(torch.arange(10_000, 10_400))
    real = measure(x, space, ref, labels=cond["labels"])
    noise = measure(torch.rand_like(x, generator=torch.Generator().manual_seed(0)) * 2 - 1, space, ref)
    assert real["FD-MovingMNIST"] < 0.05 * noise["FD-MovingMNIST"]
    assert real["FD-MNIST-frames"] < 0.05 * noise["FD-MNIST-frames"]
    assert real["temporal_consistency"] > 0.9 and real["frame_agreement"] > 0.95
    assert real["accuracy"] > 0.7
    g = torch.Generator().manual_seed(1)
    shuffled = torch.stack([x[torch.randperm(len(x), generator=g), :, t] for t in range(x.shape[2])], dim=2)
    mixed = measure(shuffled, space, ref)
    assert mixed["temporal_consistency"] < 0.1 and mixed["frame_agreement"] < 0.5
    assert mixed["FD-MNIST-frames"] < 0.2 * noise["FD-MNIST-frames"]  # the frames themselves are still real


def test_audio_fd_real_vs_noise(data_env):
    """Training clips against the test split: FD-SpokenDigits small (measured 10) and white noise of the same
    peak far away (46,000); class accuracy 96 % real."""
    from scm.data import load_dataset
    from scm.metrics import measure, open_reference

    space, ref = open_reference("spoken-digits:test", log=lambda m: None)
    assert space.metric == "FD-SpokenDigits" and space.frames is None and ref.shape == (1, 16000)
    data = load_dataset("spoken-digits")
    x, cond = data.batch(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:300])
    real = measure(x, space, ref, labels=cond["labels"])
    noise = measure(0.9 * (torch.rand_like(x) * 2 - 1), space, ref)
    assert real["FD-SpokenDigits"] < 0.05 * noise["FD-SpokenDigits"]
    assert real["accuracy"] > 0.8 and "temporal_consistency" not in real


def test_cache_round_trip_and_damaged_file(data_env, tmp_path):
    """A cached classifier reloads to the same features; the statistics file keeps the per-frame part; a
    damaged weights file is named."""
    from scm.metrics import RefStats
    from scm.metrics.classifier import get_classifier
    from scm.metrics.quality import open_reference

    root = data_env[0]
    model, info = get_classifier("spoken-digits")
    assert info["modality"] == "audio"
    x = torch.linspace(-0.5, 0.5, 2 * 16000).reshape(2, 1, 16000)
    again, _ = get_classifier("spoken-digits")
    assert torch.equal(model.embed(x)[0], again.embed(x)[0])
    _, ref = open_reference("moving-mnist-tiny:test", log=lambda m: None)
    path = tmp_path / "ref.npz"
    ref.save(path)
    back = RefStats.load(path)
    assert back.frames.space == "frames:mnist" and (back.frames.mu == ref.frames.mu).all()
    space2, ref2 = open_reference(str(path), log=lambda m: None)
    assert space2.metric == "FD-MovingMNIST" and space2.frames is not None and ref2.shape == (1, 8, 32, 32)
    damaged = tmp_path / "classifiers"
    damaged.mkdir()
    for suffix in (".safetensors", ".json"):
        (damaged / f"spoken-digits{suffix}").write_bytes((root / "classifiers" / f"spoken-digits{suffix}").read_bytes())
    weights = damaged / "spoken-digits.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"spoken-digits\.safetensors"):
        get_classifier("spoken-digits", root=tmp_path)


def test_bad_input_is_named(data_env):
    """Samples of another modality or shape, FID on audio, colour clips for per-frame MNIST, ragged frames."""
    from scm.metrics import measure, mnist_frames, open_reference, temporal_consistency
    from scm.metrics.classifier import get_classifier

    space, ref = open_reference("spoken-digits:test", log=lambda m: None)
    with pytest.raises(DataError, match=r"16000×1 audio clips.*28×28×1 images"):
        measure(torch.zeros(4, 1, 28, 28), space, ref)
    with pytest.raises(DataError, match="8000×1 audio clips"):
        measure(torch.zeros(4, 1, 8000), space, ref)
    with pytest.raises(DataError, match=r"FID .*audio"):
        open_reference("spoken-digits:test", metric="fid")
    model, _ = get_classifier("moving-mnist-tiny")
    with pytest.raises(DataError, match=r"video classifier takes \[N, 1, …\]"):
        model.embed(torch.zeros(2, 1, 32, 32))
    with pytest.raises(DataError, match="grey video"):
        mnist_frames(torch.zeros(2, 3, 4, 32, 32))
    with pytest.raises(DataError, match="whole clips of 8 frames"):
        temporal_consistency(torch.rand(12, 10), 8)
    with pytest.raises(DataError, match="labels"):
        measure(torch.zeros(4, 1, 16000), space, ref, labels=torch.zeros(3, dtype=torch.long))


@pytest.fixture
def one_thread():
    """One torch thread for tiny networks (two threads on a shared two-core machine wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset, ref, columns", [
    ("video-tiny-8x32-sct", "moving-mnist-tiny:test",
     ["FD-MovingMNIST", "class accuracy", "FD-MNIST-frames", "temporal consistency"]),
    ("audio-tiny-16k-sct", "spoken-digits:test", ["FD-SpokenDigits", "class accuracy"]),
])
def test_cli_eval_of_a_class_conditional_run(data_env, tmp_path, one_thread, preset, ref, columns):
    """`scm eval` of a two-step class-conditional video or audio run (built-in data, one network layer): the
    table has the modality's columns, the JSON each row's figures (the class each sample was asked for judged
    by the data set's classifier)."""
    import json

    from scm.config import make_config
    from scm.data import load_dataset
    from scm.train import train

    from conftest import cli

    run = tmp_path / "run"
    data = load_dataset(ref.split(":")[0]).subset(0, 64)
    overrides = ["progress=false", "tensorboard=false", "sample_count=2", "sample_ode_steps=2", "net.depth=1"]
    train(make_config(preset, None, overrides, out=str(run), kimg=0.008, batch=4, conditional=True), data=data)
    code, out = cli("eval", "--ckpt", run, "--ref", ref, "--n", 20, "--steps", 1, "--batch", 20,
                    "--out", tmp_path / "eval")
    assert code == 0, out
    header = next(line for line in out.splitlines() if line.startswith("| sampler"))
    assert all(f"| {c} |" in header for c in columns), header
    (row,) = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert 0 <= row["accuracy"] <= 1 and row["n"] == 20 and row["finite"]
    if "video" in preset:
        assert row["FD-MNIST-frames"] > 0 and 0 <= row["temporal_consistency"] <= 1
