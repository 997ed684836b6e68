"""Latent space (scm.data.latents, `scm data encode`): the per-channel normalisation of App. G.1 and its inverse,
flips, posterior samples, resuming, errors; and a run on latents trained, sampled and evaluated through the CLI,
whose samples are decoded to images. A small random AutoencoderKL (32×32×3 → 16×16×4) stands in for SD's VAE."""

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="the latent tests need diffusers: pip install scm[latent]")

from scm.data import load_dataset
from scm.data.latents import NAMED_STATS, decode, denormalize, encode, load_vae, normalize
from scm.errors import DataError

from conftest import cli, make_shapes, save_tiny_vae

RUN = ["progress=false", "tensorboard=false", "sample_count=4", "sample_ode_steps=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """root/vae (a random AutoencoderKL with two down blocks: /2) and root/pixels.npz (64 labelled 32×32×3)."""
    root = tmp_path_factory.mktemp("latent")
    save_tiny_vae(root / "vae")
    images, labels = make_shapes(64, res=32, channels=3)
    np.savez(root / "pixels.npz", x=images, y=labels)
    return root


def pixels(root, n=None) -> torch.Tensor:
    data = load_dataset(root / "pixels.npz")
    return data.batch(torch.arange(n or len(data)))[0]


@torch.no_grad()
def raw_latents(root, x) -> torch.Tensor:
    return load_vae(root / "vae").encode(x).latent_dist.mean


def stored(path) -> tuple[torch.Tensor, dict]:
    data = load_dataset(path)
    return torch.from_numpy(np.array(data.images)), data.latent


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_measured_normalisation_and_its_inverse(files, tmp_path, dtype):
    path = encode(files / "pixels.npz", files / "vae", tmp_path / "lat", dtype=dtype, batch=24, progress=False)
    x, info = stored(path)
    assert x.shape == (64, 4, 16, 16) and x.dtype == getattr(torch, dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat"]  # the float32 scratch is gone
    assert info["vae"] == str((files / "vae").resolve()) and info["which"] == "mean" and info["sigma_d"] == 0.5
    assert (info["image_shape"], info["normalization"]) == ([3, 32, 32], "measured")
    assert torch.equal(load_dataset(path).labels, load_dataset(files / "pixels.npz").labels)
    # per channel over items and positions: mean 0, std σ_d (float16: its rounding, u = 2^-11, of values ~0.5)
    tol = 1e-6 if dtype == "float32" else 1e-3
    torch.testing.assert_close(x.double().mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=tol, rtol=0)
    torch.testing.assert_close(x.double().std((0, 2, 3), correction=0), torch.full((4,), 0.5, dtype=torch.float64),
                               atol=tol, rtol=0)
    # the stored latent is the raw one normalised, rounded once to the storage dtype (relative error ≤ u)
    raw = raw_latents(files, pixels(files))
    u = 2.0**-24 if dtype == "float32" else 2.0**-11
    torch.testing.assert_close(x.double(), normalize(raw.double(), info["mean"], info["std"]), rtol=2 * u,
                               atol=1e-6)
    # denormalising inverts it: the error is the storage's, scaled by σ_c/σ_d (plus float32 rounding)
    back = denormalize(x.float(), info["mean"], info["std"], info["sigma_d"])
    scale = torch.tensor(info["std"]).view(1, 4, 1, 1) / info["sigma_d"]
    bound = scale * (2 * u * x.float().abs() + 1e-6) + 2.0**-23 * raw.abs()
    assert ((back - raw).abs() <= bound).all()
    # decoding: denormalise exactly, then the recorded VAE (float32: the same images; float16: within ~1e-3)
    with torch.no_grad():
        expected = load_vae(files / "vae").decode(raw).sample.clamp(-1, 1)
    images = decode(x, info)
    assert images.shape == (64, 3, 32, 32) and images.abs().max() <= 1
    rel = (images - expected).norm() / expected.norm()
    assert rel < (1e-5 if dtype == "float32" else 2e-3), rel


def test_flip_stores_the_mirror_after_each_image_and_named_statistics(files, tmp_path):
    eight = load_dataset(files / "pixels.npz").subset(0, 8)
    path = encode(eight, files / "vae", tmp_path / "flip", flip=True, normalization="sd-vae-ft-mse", dtype="float32",
                  batch=3, progress=False)
    x, info = stored(path)
    assert len(x) == 16 and info["flip"] and info["normalization"] == "sd-vae-ft-mse"
    mu, sigma = NAMED_STATS["sd-vae-ft-mse"]
    assert info["mean"] == [1.56, -0.695, 0.483, 0.729] == list(mu) and info["std"] == list(sigma)
    assert torch.equal(load_dataset(path).labels, eight.labels.repeat_interleave(2))
    images = pixels(files, 8)
    raw, mirrored = raw_latents(files, images), raw_latents(files, images.flip(-1))
    torch.testing.assert_close(x[0::2], (raw - torch.tensor(mu).view(1, 4, 1, 1)) * 0.5 / torch.tensor(sigma).view(
        1, 4, 1, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x[1::2], normalize(mirrored, mu, sigma), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x[0::2], x[1::2])


def test_vae_normalisation_is_the_vaes_own_scaling(files, tmp_path):
    """normalization="vae": (z − shift_factor)·scaling_factor, the data of a diffusers latent model, decoded back
    exactly; its std is not σ_d, so a run's loss.sigma_d is not held to it."""
    from scm.config import make_config
    from scm.train.resolve import resolve

    eight = load_dataset(files / "pixels.npz").subset(0, 8)
    path = encode(eight, files / "vae", tmp_path / "v", normalization="vae", dtype="float32", progress=False)
    x, info = stored(path)
    scale = load_vae(files / "vae").config.scaling_factor
    raw = raw_latents(files, pixels(files, 8))
    torch.testing.assert_close(x, raw * scale, rtol=1e-5, atol=1e-6)  # no shift_factor in this VAE's config
    assert info["normalization"] == "vae"
    back = denormalize(x, info["mean"], info["std"], info["sigma_d"])
    torch.testing.assert_close(back, raw, rtol=1e-5, atol=1e-6)
    cfg = make_config("tiny-latent-scd", None, ["loss.sigma_d=0.9"], data=str(path), out=str(tmp_path / "r"),
                      teacher="a.module:function")  # a teacher to be called later: resolving does not load it
    assert resolve(cfg, load_dataset(path)).loss.sigma_d == 0.9  # no σ_d mismatch for latents at the VAE's scale


def test_posterior_samples_are_seeded_per_image(files, tmp_path):
    eight = load_dataset(files / "pixels.npz").subset(0, 8)
    kw = dict(which="sample", normalization="sd-vae-ft-mse", dtype="float32", progress=False)
    a, info = stored(encode(eight, files / "vae", tmp_path / "a", batch=8, seed=1, **kw))
    b, _ = stored(encode(eight, files / "vae", tmp_path / "b", batch=3, seed=1, **kw))
    c, _ = stored(encode(eight, files / "vae", tmp_path / "c", batch=8, seed=2, **kw))
    mean, _ = stored(encode(eight, files / "vae", tmp_path / "m", normalization="sd-vae-ft-mse", dtype="float32",
                            progress=False))
    assert info["which"] == "sample" and info["seed"] == 1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # independent of the batch size
    assert not torch.allclose(a, c) and not torch.allclose(a, mean)


def test_an_interrupted_encoding_continues(files, tmp_path, monkeypatch):
    """Interrupted while encoding into the scratch, then again while normalising into the output: the third run
    finishes, and the result is the uninterrupted one."""
    import scm.data.latents as latents
    from scm.data.prepared import PreparedWriter

    clean, _ = stored(encode(files / "pixels.npz", files / "vae", tmp_path / "clean", dtype="float16", batch=16,
                             progress=False))
    append = PreparedWriter.append
    for where in ("float32", "float16"):  # the scratch's chunks, then the output's
        calls = []

        def failing(self, images, *args, where=where, calls=calls, **kw):
            if self.dtype == where and len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(1) if self.dtype == where else None
            return append(self, images, *args, **kw)

        monkeypatch.setattr(PreparedWriter, "append", failing)
        with pytest.raises(KeyboardInterrupt):
            latents.encode(files / "pixels.npz", files / "vae", tmp_path / "lat", dtype="float16", batch=16,
                           progress=False)
        partial = tmp_path / ("lat.raw.partial" if where == "float32" else "lat.partial")
        assert json.loads((partial / "progress.json").read_text())["written"] == 32
    monkeypatch.setattr(PreparedWriter, "append", append)
    x, _ = stored(encode(files / "pixels.npz", files / "vae", tmp_path / "lat", dtype="float16", batch=16,
                         progress=False))
    assert torch.equal(x, clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "lat"]


def test_errors_name_what_is_wrong(files, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nowhere"))):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no config\.json"):
        load_vae(tmp_path / "empty")
    images, labels = make_shapes(8, res=32, channels=1)
    np.savez(tmp_path / "gray.npz", x=images[..., 0], y=labels)
    with pytest.raises(DataError, match="1 channel"):
        encode(tmp_path / "gray.npz", files / "vae", tmp_path / "x", progress=False)
    with pytest.raises(DataError, match="latents have 4 channels"):
        encode(files / "pixels.npz", files / "vae", tmp_path / "x", normalization=([0.0] * 3, [1.0] * 3),
               progress=False)
    lat = encode(load_dataset(files / "pixels.npz").subset(0, 4), files / "vae", tmp_path / "lat", progress=False)
    with pytest.raises(DataError, match="already latents"):
        encode(lat, files / "vae", tmp_path / "again", progress=False)
    # the command line
    code, text = cli("data", "encode", "--vae", tmp_path / "nowhere", "--data", files / "pixels.npz",
                     "--out", tmp_path / "y")
    assert code == 2 and str(tmp_path / "nowhere") in text and "--vae" in text and "Traceback" not in text, text
    code, text = cli("data", "encode", "--vae", files / "vae", "--data", files / "pixels.npz", "--out", lat)
    assert code == 2 and "--out" in text and "already exists" in text, text
    code, text = cli("data", "encode", "--vae", files / "vae", "--data", files / "pixels.npz", "--out",
                     tmp_path / "y", "--normalization", "sd-vae")
    assert code == 2 and "--normalization" in text and "sd-vae-ft-mse" in text, text
    monkeypatch.setitem(sys.modules, "diffusers", None)  # diffusers not installed
    code, text = cli("data", "encode", "--vae", files / "vae", "--data", files / "pixels.npz", "--out", tmp_path / "z")
    assert code == 2 and "pip install scm[latent]" in text and "Traceback" not in text, text


def test_train_sample_and_eval_on_latents(files, tmp_path, monkeypatch):
    """`scm data encode` → `scm train` (a diffusion teacher and sCT) → `scm sample` / `scm eval`: the run records
    its data's latent information, and every sample it writes is a decoded 32×32×3 image."""
    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "data"))
    lat, teacher, sct = tmp_path / "lat", tmp_path / "teacher", tmp_path / "sct"
    code, text = cli("data", "encode", "--vae", files / "vae", "--data", files / "pixels.npz", "--out", lat,
                     "--flip", "--resolution", 32, "--no-progress")
    assert code == 0, text
    assert "128 latents, 16×16, 4 channel(s)" in text and "normalisation (measured)" in text
    info = load_dataset(lat).latent
    for preset, out in (("tiny-latent-diffusion", teacher), ("tiny-latent-sct", sct)):
        code, text = cli("train", "--preset", preset, "--data", lat, "--out", out, "--kimg", 0.032, "--batch", 16,
                         *RUN)
        assert code == 0, text
        assert json.loads((out / "latent.json").read_text()) == info
        grids = sorted((out / "samples").glob("*.png"))
        assert grids and all(Image.open(g).size == (2 * (3 * 32 + 1) + 1,) * 2 for g in grids)  # decoded, ×3
    code, text = cli("train", "--preset", "tiny-latent-sct", "--data", lat, "--out", tmp_path / "bad", "--kimg",
                     0.032, "--batch", 16, *RUN, "loss.sigma_d=1.0")
    assert code == 2 and "σ_d = 0.5" in text, text
    # a teacher (or init) of another space is refused: pixels, or latents normalised otherwise
    code, text = cli("train", "--preset", "tiny-32-scd", "--teacher", teacher, "--data", files / "pixels.npz", "--out",
                     tmp_path / "bad2", "--kimg", 0.032, "--batch", 16, *RUN)
    assert code == 2 and f"teacher {teacher} was trained on latents of" in text and "data are pixels" in text, text
    code, text = cli("data", "encode", "--vae", files / "vae", "--data", files / "pixels.npz", "--out",
                     tmp_path / "lat-sd", "--normalization", "sd-vae-ft-mse", "--no-progress")
    assert code == 0, text
    code, text = cli("train", "--preset", "tiny-latent-sct", "--init", teacher, "--data", tmp_path / "lat-sd",
                     "--out", tmp_path / "bad3", "--kimg", 0.032, "--batch", 16, *RUN)
    assert code == 2 and "(they differ in mean, std)" in text, text

    code, text = cli("sample", "--ckpt", sct, "--steps", 2, "--n", 5, "--batch", 2, "--out", tmp_path / "s.npz")
    assert code == 0, text
    x = np.load(tmp_path / "s.npz")["x"]
    assert x.shape == (5, 32, 32, 3) and x.dtype == np.uint8
    code, text = cli("sample", "--ckpt", teacher, "--nfe", 3, "--n", 2, "--out", tmp_path / "folder")
    assert code == 0, text
    assert [Image.open(p).size for p in sorted((tmp_path / "folder").iterdir())] == [(32, 32)] * 2

    code, text = cli("eval", "--ckpt", sct, "--ref", files / "pixels.npz", "--steps", 1, "--n", 8, "--out",
                     tmp_path / "ev")
    assert code == 0, text
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["metric"] == "FD-PIXELS" and result["rows"][0]["FD-PIXELS"] > 0
    code, text = cli("eval", "--ckpt", sct, "--ref", lat, "--steps", 1, "--n", 8, "--out", tmp_path / "ev2")
    assert code == 2 and "the images the latents were encoded from" in text, text

    # the VAE moved away: sampling says which folder it needs, before any network runs
    import scm.data.latents as latents

    monkeypatch.setattr(latents, "_VAES", {})
    (sct / "latent.json").write_text(json.dumps({**info, "vae": str(tmp_path / "moved")}))
    code, text = cli("sample", "--ckpt", sct, "--steps", 1, "--n", 2, "--out", tmp_path / "t.png")
    assert code == 2 and str(tmp_path / "moved") in text, text


def test_encode_a_folder_of_jpegs_of_other_sizes(files, tmp_path):
    """`--resolution` on raw images prepares them first (centre crop + area resize) into OUT-images, the pixel
    reference for `scm eval`, then encodes that; a second run reuses the prepared images."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (64, 36), (32, 32), (70, 70)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (tmp_path / "jpegs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "jpegs" / f"c{i % 2}" / f"{i}.jpg", quality=90)
    args = ["data", "encode", "--vae", files / "vae", "--data", tmp_path / "jpegs", "--out", tmp_path / "lat",
            "--resolution", 32, "--no-progress"]
    code, out = cli(*args)
    assert code == 0, out
    assert "the pixel reference for evaluating a run" in out and "4 latents, 16×16, 4 channel(s), 2 classes" in out
    images = load_dataset(tmp_path / "lat-images")
    assert (len(images), images.shape) == (4, (3, 32, 32))
    assert load_dataset(tmp_path / "lat").latent["image_shape"] == [3, 32, 32]
    stamp = (tmp_path / "lat-images" / "images.bin").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "lat")
    code, out = cli(*args)  # encoding again: the prepared images are reused, not prepared again
    assert code == 0 and "4 latents" in out, out
    assert (tmp_path / "lat-images" / "images.bin").stat().st_mtime_ns == stamp
