"""Prepared data sets: the on-disk format and its errors, the resumable writer, `prepare` (decoding rules, ADM's
centre crop with area resize, bad files, interrupted runs), training and reference statistics on a prepared
directory."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from scm.data import ImageData, PreparedData, load_dataset
from scm.data import preprocess as pp
from scm.data.prepare import prepare
from scm.data.prepared import PreparedWriter, load_prepared
from scm.errors import DataError

from conftest import cli, make_shapes

R = 16


def _write(path, n=10, shape=(3, 4, 4), chunk=4, labelled=True, key="k", **meta):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, 3, n)
    w = PreparedWriter(path, shape, "uint8", n + 5, labelled=labelled, key=key)
    for i in range(0, n, chunk):
        w.append(x[i: i + chunk], y[i: i + chunk] if labelled else None, extra={"consumed": i + chunk})
    assert not path.exists()  # nothing under the final name until finish()
    return w.finish({"source": "test", **meta}), x, y


def _files(path):
    return {name: (path / name).read_bytes() for name in ("meta.json", "images.bin", "labels.bin")
            if (path / name).exists()}


# -- the format -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_memory", [None, False], ids=["default (small: in memory)", "read by batch"])
def test_round_trip_values_labels_and_class_names(tmp_path, in_memory):
    path, x, y = _write(tmp_path / "d", class_names=["a", "b", "c"])
    data = load_dataset(path) if in_memory is None else load_prepared(path, in_memory=in_memory)
    assert isinstance(data, PreparedData) and len(data) == 10 and data.shape == (3, 4, 4)
    assert data.in_memory is (in_memory is None)
    assert np.array_equal(data.gather(np.arange(10)).numpy(), x) and data.labels.tolist() == y.tolist()
    assert data.class_names == ["a", "b", "c"] and data.num_classes == 3
    xb, cond = data.batch(torch.tensor([7, 2, 7]))
    assert torch.equal(xb, torch.from_numpy(x[[7, 2, 7]]).float() / 127.5 - 1)
    assert list(cond) == ["labels"] == list(data.conditions) and cond["labels"].tolist() == y[[7, 2, 7]].tolist()
    sub = data.subset(8, None, "tail")
    assert len(sub) == 2 and np.array_equal(sub.gather([0, 1]).numpy(), x[8:]) and sub.source == "tail"
    inner = data.subset(-6).subset(1, 4)  # a view of a view: items 5, 6, 7
    assert np.array_equal(inner.gather([2, 0, -1, 1]).numpy(), x[[7, 5, 7, 6]])
    with pytest.raises(IndexError):
        inner.gather([3])
    how = "read into memory" if in_memory is None else "read from disk by batch"
    assert "10 images, 4×4, 3 channel(s), 3 classes" in data.describe() and how in data.describe()


def test_format_errors_name_the_file(tmp_path):
    path, _, _ = _write(tmp_path / "d")
    images = path / "images.bin"
    images.write_bytes(images.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"images\.bin: .*truncated"):
        load_prepared(path)
    path, _, _ = _write(tmp_path / "e")
    (path / "labels.bin").unlink()
    with pytest.raises(DataError, match=r"labels\.bin: missing"):
        load_prepared(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: cannot read"):
        load_prepared(path)
    (path / "meta.json").write_text(json.dumps({"format": "scm-prepared", "version": 1, "count": 10}))
    with pytest.raises(DataError, match=r"meta\.json: missing or malformed field"):
        load_prepared(path)


def test_writer_resumes_an_interrupted_run(tmp_path):
    straight, x, y = _write(tmp_path / "straight")
    out = tmp_path / "split"
    w = PreparedWriter(out, (3, 4, 4), "uint8", 15, labelled=True, key="k")
    w.append(x[:4], y[:4], extra={"consumed": 4})
    del w  # a crash: DIR.partial stays, DIR does not exist
    assert not out.exists() and (tmp_path / "split.partial").is_dir()
    with pytest.raises(DataError, match="interrupted preparation of something else"):
        PreparedWriter(out, (3, 4, 4), "uint8", 15, labelled=True, key="other")
    w = PreparedWriter(out, (3, 4, 4), "uint8", 15, labelled=True, key="k")
    assert w.written == 4 and w.progress["consumed"] == 4
    for i in range(4, 10, 4):
        w.append(x[i: i + 4], y[i: i + 4], extra={"consumed": i + 4})
    w.finish({"source": "test"})
    assert _files(out) == _files(straight)
    fresh = PreparedWriter(tmp_path / "again", (3, 4, 4), "uint8", 15, labelled=True, key="k", resume=False)
    assert fresh.written == 0


# -- the preprocessing rules ------------------------------------------------------------------------------------
def _save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _mode_zoo(root):
    """R×R images in many modes, each of one colour: (file name → expected RGB with alpha=white, with drop)."""
    full = (R, R)
    _save(Image.new("RGBA", full, (255, 0, 0, 128)), root / "a_rgba.png")
    _save(Image.new("LA", full, (100, 0)), root / "b_la.png")
    _save(Image.new("L", full, 77), root / "c_grey.png")
    _save(Image.new("1", full, 1), root / "d_bilevel.png")
    p = Image.new("P", full, 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    _save(p, root / "e_palette.png")
    _save(p, root / "f_palette_transparent.png", transparency=1)
    _save(Image.fromarray(np.full(full, 32768, np.uint16)), root / "g_16bit.png")
    _save(Image.new("CMYK", full, (0, 255, 255, 0)), root / "h_cmyk.jpg", quality=95)
    _save(Image.new("RGB", full, (0, 0, 255)), root / "i_rgb.bmp")
    _save(Image.new("RGB", full, (0, 128, 0)), root / "j_rgb.webp", lossless=True)
    _save(Image.new("RGB", full, (1, 2, 3)), root / "k_rgb.tiff")
    frames = [Image.new("P", full, i) for i in (2, 3)]
    for f in frames:
        f.putpalette([0] * 6 + [9, 8, 7, 6, 5, 4] + [0] * 756)
    frames[0].save(root / "l_anim.gif", save_all=True, append_images=frames[1:])
    return {"a_rgba.png": ((255, 128, 128), (255, 0, 0)), "b_la.png": ((255,) * 3, (100,) * 3),
            "c_grey.png": ((77,) * 3,) * 2, "d_bilevel.png": ((255,) * 3,) * 2, "e_palette.png": ((10, 200, 30),) * 2,
            "f_palette_transparent.png": ((255, 255, 255), (10, 200, 30)), "g_16bit.png": ((128,) * 3,) * 2,
            "h_cmyk.jpg": ((255, 0, 0),) * 2, "i_rgb.bmp": ((0, 0, 255),) * 2, "j_rgb.webp": ((0, 128, 0),) * 2,
            "k_rgb.tiff": ((1, 2, 3),) * 2, "l_anim.gif": ((9, 8, 7),) * 2}


def test_mode_rules_on_pixel_values(tmp_path):
    expected = _mode_zoo(tmp_path / "zoo")
    with pytest.raises(DataError, match=r"greyscale image.*colour image.*choose 1 or 3 channels") as e:
        prepare(tmp_path / "zoo", tmp_path / "x", resolution=R, progress=False)
    assert e.value.key == "channels"
    names = sorted(expected)
    for alpha, which in (("white", 0), ("drop", 1)):
        data = load_prepared(prepare(tmp_path / "zoo", tmp_path / alpha, resolution=R, channels=3, alpha=alpha,
                                     progress=False))
        assert data.labels is None and data.meta["preprocessing"]["alpha"] == alpha
        x = data.gather(np.arange(len(names))).numpy().astype(int)
        for i, name in enumerate(names):
            assert (x[i] == x[i, :, :1, :1]).all(), name  # one colour everywhere
            tol = 3 if name.endswith(".jpg") else 1
            assert np.abs(x[i, :, 0, 0] - expected[name][which]).max() <= tol, (name, alpha, x[i, :, 0, 0])
    grey = load_prepared(prepare(tmp_path / "zoo", tmp_path / "grey", resolution=R, channels=1, progress=False))
    g = grey.gather(np.arange(len(names))).numpy()[:, 0, 0, 0].astype(int)
    luma = {n: round(0.299 * c[0][0] + 0.587 * c[0][1] + 0.114 * c[0][2]) for n, c in expected.items()}
    assert all(abs(g[i] - luma[n]) <= (3 if n.endswith(".jpg") else 1) for i, n in enumerate(names)), g


def test_sixteen_bit_scaling_is_round_v_over_257():
    v = np.array([[0, 128, 129, 257, 385, 386, 32768, 65535]], np.uint16)
    img = Image.open(io.BytesIO(_png(Image.fromarray(v))))
    assert img.mode.startswith("I;16")
    assert pp.to_array(img, 1)[0, :, 0].tolist() == [0, 0, 1, 1, 1, 2, 128, 255]
    assert pp.to_array(img, 3).shape == (1, 8, 3)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_center_crop_area_resize_against_an_independent_computation(tmp_path):
    rng = np.random.default_rng(0)
    # 64×128 → two box halvings (16×32), no bicubic step (scale 1), centre crop at x = 8: 4×4 block means, up to
    # 8-bit rounding: each halving averages pairs along x, then along y, rounding halves up (Pillow's fixed point)
    x = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    out = np.asarray(pp.center_crop_resize(Image.fromarray(x), R)).astype(float)
    blocks = x.reshape(16, 4, 32, 4, 3).mean((1, 3))[:, 8:24]
    assert out.shape == (R, R, 3) and np.abs(out - blocks).max() <= 2

    def halve(a):
        a = np.floor(a.reshape(a.shape[0], -1, 2, 3).mean(2) + 0.5)
        return np.floor(a.reshape(-1, 2, *a.shape[1:]).mean(1) + 0.5)

    assert np.array_equal(out, halve(halve(x.astype(float)))[:, 8:24])
    # 40 high × 60 wide: one halving (30×20), bicubic to 24×16, crop x 4…20. Three vertical bands of 20 columns
    # (0, 255, 0) land at columns 0–8, 8–16, 16–24 of the 24-wide image, i.e. −4–4, 4–12, 12–20 after the crop
    bands = np.zeros((40, 60), np.uint8)
    bands[:, 20:40] = 255
    out = np.asarray(pp.center_crop_resize(Image.fromarray(bands), R)).astype(int)
    assert out.shape == (R, R) and (out[:, :2] == 0).all() and (out[:, 6:10] == 255).all() and (out[:, 14:] == 0).all()
    # smaller than R: 8 high × 12 wide → bicubic up to 24×16, the same bands
    small = np.zeros((8, 12), np.uint8)
    small[:, 4:8] = 255
    out = np.asarray(pp.center_crop_resize(Image.fromarray(small), R)).astype(int)
    assert (out[:, :2] == 0).all() and (out[:, 6:10] == 255).all() and (out[:, 14:] == 0).all()
    # a square R×R image is untouched; the file path and the in-memory path apply the same rule
    sq = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(pp.center_crop_resize(Image.fromarray(sq), R)), sq)
    Image.fromarray(x).save(tmp_path / "x.png")
    from_file = pp.preprocess_image(tmp_path / "x.png", R, 3)
    assert np.array_equal(from_file, pp.preprocess_array(x.transpose(2, 0, 1), R, 3))


def test_a_very_thin_image_is_cut_to_its_central_part_before_the_resize(monkeypatch):
    """A 2×5000 strip at R = 512 would resize to 512×1,280,000 (655 M pixels); it is cut to its central 2×128
    (MAX_ASPECT:1) first, so no image larger than MAX_ASPECT·R² is made, and the result is the rule applied to that
    central part. An image within MAX_ASPECT:1 is resized whole, as before (3×192: 192 = MAX_ASPECT·3)."""
    rng = np.random.default_rng(0)
    made, resize = [], Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        made.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    strip = rng.integers(0, 256, (2, 5000), dtype=np.uint8)
    out = np.asarray(pp.center_crop_resize(Image.fromarray(strip), 512))
    assert out.shape == (512, 512) and max(w * h for w, h in made) <= pp.MAX_ASPECT * 512 ** 2, made
    left = (5000 - 2 * pp.MAX_ASPECT) // 2
    central = Image.fromarray(np.ascontiguousarray(strip[:, left:left + 2 * pp.MAX_ASPECT]))
    assert np.array_equal(out, np.asarray(pp.center_crop_resize(central, 512)))
    tall = rng.integers(0, 256, (3 * pp.MAX_ASPECT, 3), dtype=np.uint8)  # exactly MAX_ASPECT:1, tall: not cut
    made.clear()
    assert pp.center_crop_resize(Image.fromarray(tall), 16).size == (16, 16) and made == [(16, 16 * pp.MAX_ASPECT)]


# -- prepare ----------------------------------------------------------------------------------------------------
def _folder(root, n=24, seed=0):
    """Class sub-folders with images of mixed sizes, modes and formats."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(8, 48, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mode, ext = [("RGB", "png"), ("RGBA", "png"), ("L", "jpg"), ("P", "bmp")][i % 4]
        _save(Image.fromarray(arr).convert(mode), root / ("cat" if i % 3 else "dog") / f"{i:03d}.{ext}")
    return root


def test_prepare_folder_labels_and_bad_files(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "cat" / "zz_garbage.png").write_bytes(b"not an image")
    good = _png(Image.new("RGB", (20, 20), (1, 2, 3)))
    (root / "dog" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"zz_garbage\.png: cannot decode image") as e:
        prepare(root, tmp_path / "out", resolution=R, channels=3, progress=False)
    assert e.value.key == "skip_bad" and not (tmp_path / "out").exists()
    messages = []
    out = prepare(root, tmp_path / "out", resolution=R, channels=3, skip_bad=True, progress=False,
                  log=messages.append)
    data = load_prepared(out)
    assert len(data) == 24 and data.class_names == ["cat", "dog"] and data.labels.bincount().tolist() == [16, 8]
    meta = data.meta
    assert meta["skipped_count"] == 2 and [s["file"] for s in meta["skipped"]] == ["cat/zz_garbage.png",
                                                                                   "dog/zz_truncated.png"]
    assert "zz_truncated.png" in meta["skipped"][1]["reason"] and "skipped 2" in messages[0]
    assert meta["preprocessing"] == {"resize": "adm-center-crop", "alpha": "white", "resolution": R, "channels": 3,
                                     "sixteen_bit": "round(v / 257)"}
    files = sorted(p for p in root.rglob("*") if p.is_file() and "zz_" not in p.name)
    first = pp.preprocess_image(files[0], R, 3)
    assert np.array_equal(data.gather([0])[0].numpy(), first)
    with pytest.raises(DataError, match="already exists") as e:
        prepare(root, out, resolution=R, progress=False)
    assert e.value.key == "out"


def test_interrupted_preparation_resumes_byte_identical(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs", n=40, seed=1)
    (root / "cat" / "000_bad.png").write_bytes(b"junk")  # in the first chunk: its record must survive the resume
    kw = dict(resolution=R, channels=3, skip_bad=True, chunk=8, progress=False, log=lambda m: None)
    straight = prepare(root, tmp_path / "straight", **kw)

    calls = {"append": 0, "decoded": 0}
    append = PreparedWriter.append

    def crash_after_two_chunks(self, *a, **k):
        calls["append"] += 1
        if calls["append"] == 3:
            raise KeyboardInterrupt
        return append(self, *a, **k)

    monkeypatch.setattr(PreparedWriter, "append", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, tmp_path / "split", **kw)
    assert not (tmp_path / "split").exists() and (tmp_path / "split.partial").is_dir()
    monkeypatch.setattr(PreparedWriter, "append", append)
    with pytest.raises(DataError, match="something else"):  # other settings: not continued
        prepare(root, tmp_path / "split", **{**kw, "resolution": 8})
    decode = pp.preprocess_image

    def counting(*a, **k):
        calls["decoded"] += 1
        return decode(*a, **k)

    monkeypatch.setattr(pp, "preprocess_image", counting)
    resumed = prepare(root, tmp_path / "split", **kw)
    assert calls["decoded"] == 41 - 16  # the two chunks on disk are not decoded again
    assert _files(resumed) == _files(straight)
    assert json.loads((resumed / "meta.json").read_text())["skipped_count"] == 1


def test_prepare_in_memory_sources(tmp_path):
    images, labels = make_shapes(20, res=28, channels=3)
    np.savez(tmp_path / "s.npz", x=images, y=labels)
    same = load_prepared(prepare(tmp_path / "s.npz", tmp_path / "same", resolution=28, progress=False))
    assert np.array_equal(same.gather(np.arange(20)).numpy(), images.transpose(0, 3, 1, 2))
    assert same.labels.tolist() == labels.tolist() and same.meta["preprocessing"]["resize"] == "none"
    small = load_prepared(prepare(tmp_path / "s.npz", tmp_path / "small", resolution=R, channels=1, chunk=7,
                                  progress=False))
    want = np.stack([pp.preprocess_array(im.transpose(2, 0, 1), R, 1) for im in images])
    assert np.array_equal(small.gather(np.arange(20)).numpy(), want) and small.channels == 1
    floats = np.random.default_rng(0).standard_normal((6, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=floats)
    raw = load_prepared(prepare(tmp_path / "f.npz", tmp_path / "raw", resolution=8, progress=False))
    assert raw.meta["dtype"] == "float32" and torch.equal(raw.batch(torch.arange(6))[0], torch.from_numpy(floats))
    with pytest.raises(DataError, match="only 8-bit images are resized"):
        prepare(tmp_path / "f.npz", tmp_path / "raw16", resolution=16, progress=False)


# -- the command line, training, reference statistics --------------------------------------------------------------
def test_cli_prepare_info_and_train_on_a_prepared_directory(tmp_path):
    images, labels = make_shapes(32)
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        _save(Image.fromarray(np.pad(im[..., 0], 4)), tmp_path / "shapes" / str(lab) / f"{i}.png")  # 36×36
    code, out = cli("data", "prepare", "--data", tmp_path / "shapes", "--out", tmp_path / "prep", "--resolution", 0)
    assert code == 2 and "--resolution 0: must be a positive integer" in out
    code, out = cli("data", "prepare", "--data", tmp_path / "shapes", "--out", tmp_path / "prep", "--resolution", 28,
                    "--no-progress")
    assert code == 0 and "32 images, 28×28, 1 channel(s), 2 classes" in out, out
    code, info = cli("data", "info", tmp_path / "prep")
    assert code == 0 and "(prepared: " in info and "32 images" in info
    code, out = cli("train", "--preset", "tiny-28-diffusion", "--data", tmp_path / "prep", "--out", tmp_path / "run",
                    "--kimg", 0.016, "--batch", 8, "progress=false", "tensorboard=false", "sample_count=4",
                    "sample_ode_steps=2", "sample_every_kimg=None")
    assert code == 0, out
    (tmp_path / "shapes" / "0" / "zz.png").write_bytes(b"junk")
    code, out = cli("data", "prepare", "--data", tmp_path / "shapes", "--out", tmp_path / "prep2", "--resolution", 28,
                    "--no-progress")
    assert code == 2 and "zz.png: cannot decode image" in out and "--skip-bad" in out


def test_reference_statistics_of_a_prepared_directory_equal_in_memory(tmp_path, monkeypatch):
    from scm.metrics.classifier import Classifier
    from scm.metrics.distances import feature_stats
    from scm.metrics.quality import FeatureSpace, _test_split, open_reference, reference_stats

    images, labels = make_shapes(60)
    np.savez(tmp_path / "shapes.npz", x=images[..., 0], y=labels)
    mem = load_dataset(tmp_path / "shapes.npz")
    prep = load_dataset(prepare(tmp_path / "shapes.npz", tmp_path / "prep", resolution=28, progress=False))
    torch.manual_seed(0)
    space = FeatureSpace("classifier:shapes", classifier=Classifier(1, 2))
    a, b = reference_stats(space, mem, chunk=16), reference_stats(space, prep, chunk=16)
    for k in ("mu", "sigma", "sample"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    feats, _ = space.embed(mem.batch(torch.arange(60))[0])  # the whole set at once, as before
    mu, sigma = feature_stats(feats)
    np.testing.assert_allclose(a.mu, mu.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.sigma, sigma.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.sample, feats[torch.randperm(60, generator=torch.Generator().manual_seed(0))],
                               atol=1e-6)
    test = _test_split(str(tmp_path / "prep"), prep)  # no test split: the last 10 %, a view of the same files
    assert isinstance(test, PreparedData) and len(test) == 6 and torch.equal(test.labels, prep.labels[-6:])
    assert isinstance(_test_split(str(tmp_path / "shapes.npz"), mem), ImageData)
    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "cache"))  # end to end: classifier, cached statistics
    (_, ref_mem), (_, ref_prep) = (open_reference(str(p), log=lambda m: None)
                                   for p in (tmp_path / "shapes.npz", tmp_path / "prep"))
    assert np.array_equal(ref_mem.mu, ref_prep.mu) and np.array_equal(ref_mem.sigma, ref_prep.sigma)
