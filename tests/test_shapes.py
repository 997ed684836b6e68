"""Items are shapes, not square resolutions: a data set of 24×32 images trains (U-Net sCT, DiT diffusion, sCD from
that DiT) and samples through the command line, and the exported pipeline gives its images at their shape."""

import numpy as np
import pytest
import torch

from scm.data import load_dataset
from scm.runs import load_run

from conftest import cli

RUN = ["--kimg", 0.048, "--batch", 8, "progress=false", "tensorboard=false", "sample_count=4", "sample_ode_steps=2",
       "resolution=24,32"]


def _rectangles(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright bars on black, 24 rows × 32 columns: horizontal (label 0) or vertical (label 1)."""
    rng = np.random.default_rng(seed)
    images, labels = np.zeros((n, 24, 32), np.uint8), rng.integers(0, 2, n)
    for i in range(n):
        r, c = rng.integers(2, 18), rng.integers(2, 26)
        if labels[i]:
            images[i, 2:22, c:c + 4] = 200
        else:
            images[i, r:r + 4, 2:30] = 200
    return images, labels


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    root = tmp_path_factory.mktemp("bars")
    images, labels = _rectangles()
    np.savez(root / "bars.npz", x=images, y=labels)
    return root


def test_a_non_square_data_set_keeps_its_shape(bars):
    data = load_dataset(bars / "bars.npz")
    assert data.shape == (1, 24, 32) and "24×32, 1 channel(s), 2 classes" in data.describe()


@pytest.mark.parametrize("preset,sampling", [("tiny-28-sct", ["--steps", 2]), ("dit-tiny-28-diffusion", ["--nfe", 3])])
def test_non_square_images_train_and_sample(bars, tmp_path, preset, sampling):
    run = tmp_path / "run"
    code, text = cli("train", "--preset", preset, "--data", bars / "bars.npz", "--out", run, *RUN)
    assert code == 0, text
    loaded = load_run(run)
    assert loaded.cfg.shape == (1, 24, 32) and loaded.cfg.resolution == (24, 32)
    assert loaded.net.cfg.img_shape == (1, 24, 32) and sorted(p.name for p in (run / "samples").glob("*.png"))
    code, text = cli("sample", "--ckpt", run, *sampling, "--n", 3, "--out", tmp_path / "s.npz")
    assert code == 0, text
    with np.load(tmp_path / "s.npz") as z:
        assert z["x"].shape == (3, 24, 32, 1) and z["x"].std() > 0


def test_a_non_square_teacher_distils_and_exports(bars, tmp_path):
    pytest.importorskip("diffusers")
    from scm.diffusers import SCMPipeline

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    code, text = cli("train", "--preset", "dit-tiny-28-diffusion", "--data", bars / "bars.npz", "--out", teacher,
                     "conditional=true", *RUN)
    assert code == 0, text
    code, text = cli("train", "--preset", "dit-tiny-28-scd", "--data", bars / "bars.npz", "--out", student,
                     "--teacher", teacher, *RUN)
    assert code == 0 and f"initialized from {teacher}" in text, text
    assert load_run(student).cfg.conditional  # a student of a class-conditional teacher is conditional too
    code, text = cli("export", student, tmp_path / "pipe")
    assert code == 0, text
    images = SCMPipeline.from_pretrained(tmp_path / "pipe")(batch_size=2, num_inference_steps=2, seed=0,
                                                            class_labels=[0, 1], output_type="pt").images
    assert images.shape == (2, 1, 24, 32) and torch.isfinite(images).all()
