"""Data sets (MNIST from the wheel, IDX, CIFAR batches), the metrics (against closed forms and calibrated on
MNIST), and the Inception network's shapes and loading path."""

import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from scm.data import load_dataset
from scm.data.builtin import MNIST_SHA256, fetch_mnist, load_builtin, read_idx, safe_unpickle
from scm.errors import DataError
from scm.metrics import feature_stats, frechet_distance, kernel_distance, precision_recall


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _mnist_like(n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    return x, rng.integers(0, 10, n).astype(np.int64)


# -- MNIST ------------------------------------------------------------------------------------------------------
def test_fetch_from_a_user_pkl_gz(data_root, tmp_path):
    x, y = _mnist_like(300)
    splits = tuple((x[i::3].reshape(-1, 784).astype(np.float32) / 256, y[i::3]) for i in range(3))
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(splits)))
    notes = []
    fetch_mnist(path, log=notes.append)
    assert any("differs from the reference" in n for n in notes)
    train, test = load_builtin("mnist"), load_builtin("mnist:test")
    assert len(train) == 200 and len(test) == 100 and train.shape == (1, 28, 28)
    assert torch.equal(train.images[:100, 0], torch.from_numpy(x[0::3]))  # pixel/256 floats back to exact uint8
    assert "200 images, 28×28, 1 channel(s), 10 classes" in train.describe()


def test_pickled_code_is_refused(data_root, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(((Evil(), 1), (2, 3), (4, 5)))))
    with pytest.raises(DataError, match=r"refusing to load (posix|os)\.system"):
        fetch_mnist(path, log=lambda m: None)
    with pytest.raises(pickle.UnpicklingError):
        safe_unpickle(pickle.dumps(Evil()))


def _write_idx(path, array):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_files(data_root, tmp_path):
    x, y = _mnist_like(40)
    folder = tmp_path / "idx"
    folder.mkdir()
    _write_idx(folder / "train-images-idx3-ubyte.gz", x[:30])
    _write_idx(folder / "train-labels-idx1-ubyte.gz", y[:30].astype(np.uint8))
    _write_idx(folder / "t10k-images-idx3-ubyte", x[30:])
    _write_idx(folder / "t10k-labels-idx1-ubyte", y[30:].astype(np.uint8))
    np.testing.assert_array_equal(read_idx(folder / "t10k-images-idx3-ubyte"), x[30:])
    data = load_dataset(folder)
    assert len(data) == 30 and torch.equal(data.labels, torch.from_numpy(y[:30]))
    assert len(load_dataset(f"{folder}:test")) == 10
    fetch_mnist(folder, log=lambda m: None)
    assert len(load_builtin("mnist")) == 30
    (folder / "t10k-images-idx3-ubyte").write_bytes((folder / "t10k-images-idx3-ubyte").read_bytes()[:100])
    with pytest.raises(DataError, match="truncated IDX"):
        read_idx(folder / "t10k-images-idx3-ubyte")


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane", b"automobile"]}))
    train = load_dataset(folder)
    assert len(train) == 20 and train.shape == (3, 32, 32) and train.images.dtype == torch.uint8
    first = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0].tobytes(), np.uint8)
    assert torch.equal(train.images[0].flatten(), torch.from_numpy(first.copy()))  # CHW layout kept
    assert len(load_dataset(f"{folder}:test")) == 3
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(folder)


def test_builtin_mnist_missing_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(DataError, match="MNIST is not cached") as info:
        load_dataset("mnist")
    assert info.value.key == "mnist"  # the CLI words the fix in its own terms:
    from typer.testing import CliRunner

    from scm.app.cli import app

    result = CliRunner().invoke(app, ["train", "--preset", "tiny-28-diffusion", "--data", "mnist",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "run `scm data fetch mnist`" in result.output, result.output


def test_real_mnist_matches_the_reference_file(real_mnist, monkeypatch):
    monkeypatch.setenv("SCM_DATA_DIR", real_mnist)
    train, test = load_dataset("mnist"), load_dataset("mnist:test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the classic first training labels
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert len(MNIST_SHA256) == 64


# -- distances against closed forms ---------------------------------------------------------------------------------
def test_frechet_distance_closed_form():
    # two Gaussians with diagonal covariances: FD = Σ (μ1−μ2)² + (σ1 − σ2)²
    d = torch.float64
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=d), torch.tensor([0.5, 1.0, 0.0], dtype=d)
    v1, v2 = torch.tensor([1.0, 4.0, 0.25], dtype=d), torch.tensor([2.0, 1.0, 0.25], dtype=d)
    expected = float(((mu1 - mu2) ** 2 + (v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # and with a full rotation applied to both (FD is rotation invariant)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=d))
    fd = frechet_distance(q @ mu1, q @ torch.diag(v1) @ q.T, q @ mu2, q @ torch.diag(v2) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-9)
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    mu, s = feature_stats(x)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_kid_and_precision_recall():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 8, generator=g), torch.randn(800, 8, generator=g)
    far = torch.randn(800, 8, generator=g) + 3
    assert abs(kernel_distance(a, b, subsets=5, subset_size=400, generator=g)) < 0.05
    assert kernel_distance(a, far, subsets=5, subset_size=400, generator=g) > 1
    p, r = precision_recall(a, b)
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(a, far)
    assert p < 0.2 and r < 0.2
    p, r = precision_recall(a, a[:100] * 0.0 + a[:100].mean(0))  # collapsed samples: precise, no recall
    assert r < 0.05


# -- calibration of FD-MNIST --------------------------------------------------------------------------------------
def test_fd_mnist_calibration(real_mnist, mnist_classifier, monkeypatch, tmp_path):
    """Real test digits are close to the training digits; noise and blurred digits are far. (A quickly trained
    classifier, one epoch: the production one trains four, the calibration is the same.)"""
    from scm.metrics import measure
    from scm.metrics.quality import FeatureSpace, RefStats

    monkeypatch.setenv("SCM_DATA_DIR", real_mnist)
    train, test = load_dataset("mnist"), load_dataset("mnist:test")
    model, info = mnist_classifier
    assert info["test_accuracy"] > 0.95
    space = FeatureSpace("classifier:mnist", classifier=model)
    ref_x, _ = train.batch(torch.arange(20000, 30000))
    feats, _ = space.embed(ref_x)
    mu, sigma = feature_stats(feats)
    ref = RefStats(mu.numpy(), sigma.numpy(), feats[:5000].numpy(), space.key, (1, 28, 28), "MNIST[20000:30000]", 10000)
    x, _ = test.batch(torch.arange(1000))
    real = measure(x, space, ref)["FD-MNIST"]
    noise = measure(torch.rand_like(x) * 2 - 1, space, ref)["FD-MNIST"]
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.avg_pool2d(x, 3, 1, 1), 3, 1, 1)
    blurred = measure(blur, space, ref)["FD-MNIST"]
    assert real < 0.05 * noise and real < 0.25 * blurred, (real, blurred, noise)
    assert measure(x, space, ref)["confident"] > 0.8  # one epoch of training; the demo's classifier: 99 %
    # the value falls as a teacher trains (a tiny diffusion model after 1 and after 30 steps of batch 32)
    from scm.config import make_config
    from scm.generate import Sampler, generate
    from scm.runs import load_run
    from scm.train import train

    fds = []
    for kimg in (0.032, 0.96):
        out = tmp_path / f"teacher-{kimg}"
        cfg = make_config("tiny-28-diffusion", None, ["progress=false", "tensorboard=false", "sample_count=4",
                          "sample_ode_steps=1", "optim.lr_rampup_kimg=0"], data="mnist", out=str(out), kimg=kimg,
                          batch=32)
        train(cfg)
        images, _ = generate(load_run(out), 200, Sampler(nfe=6, solver="euler"), progress=False)
        fds.append(measure(images, space, ref)["FD-MNIST"])
    assert fds[1] < 0.8 * fds[0], fds

    ref.save(tmp_path / "ref.npz")
    again = RefStats.load(tmp_path / "ref.npz")
    assert measure(x, space, again)["FD-MNIST"] == pytest.approx(real)
    with pytest.raises(DataError, match="28×28×1"):
        measure(torch.zeros(4, 3, 32, 32), space, again)


# -- Inception ------------------------------------------------------------------------------------------------------
def test_inception_shapes_and_loading(tmp_path, monkeypatch):
    from scm.metrics.inception import FIDInceptionV3, InceptionError, load_inception

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    feats = net.features(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert net.features(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 2048)
    path = tmp_path / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(InceptionError, match="sha256"):
        load_inception(path)  # random weights are not the real file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_inception(path, expected_sha256=digest)
    torch.testing.assert_close(loaded.features(torch.zeros(1, 3, 32, 32)), net.features(torch.zeros(1, 3, 32, 32)))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    monkeypatch.setenv("SCM_INCEPTION_WEIGHTS", str(tmp_path / "w.safetensors"))
    assert isinstance(load_inception(), FIDInceptionV3)
    monkeypatch.delenv("SCM_INCEPTION_WEIGHTS")
    with pytest.raises(InceptionError, match="SCM_INCEPTION_WEIGHTS"):
        load_inception()
    with pytest.raises(InceptionError, match="not found"):
        load_inception(tmp_path / "nope.pth")


def test_cli_data_info_and_fetch_errors(tmp_path):
    scm = [sys.executable, "-m", "scm"]
    proc = subprocess.run([*scm, "data", "fetch", "cifar"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown data set 'cifar'" in proc.stderr
    proc = subprocess.run([*scm, "data", "info", str(tmp_path / "none")], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_seed_interval_against_closed_forms():
    """The 95 % t-interval of a mean over seeds. Student's t has closed-form quantiles for df = 1 (Cauchy:
    tan(π(p − ½))) and df = 2 ((2p − 1)/sqrt(2p(1 − p))); the table holds them to 3 decimals, hence 1e-3."""
    import math

    from scm.metrics import seed_interval
    from scm.metrics.intervals import t95

    p = 0.975
    assert t95(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-3)
    assert t95(2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), abs=1e-3)
    assert t95(11) == t95(10) and t95(1000) == 1.96  # between rows: the smaller df's (wider); large df: normal
    s = seed_interval([10.0, 12.0, 14.0])  # mean 12, sample std 2 (n − 1)
    assert (s.mean, s.std) == (12.0, 2.0)
    assert s.half_width == pytest.approx(t95(2) * 2 / math.sqrt(3), rel=1e-12)
    assert s.low == pytest.approx(12 - s.half_width) and s.high == pytest.approx(12 + s.half_width)
    one = seed_interval([5.0])
    assert (one.mean, one.std, one.low, one.half_width) == (5.0, None, None, None)
    assert seed_interval([1.0, float("nan")]).low is None  # a failed evaluation gives no interval
    with pytest.raises(ValueError):
        seed_interval([])
    with pytest.raises(ValueError):
        t95(0)
