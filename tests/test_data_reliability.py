"""Hostile inputs to `scm data prepare` / `scm data encode`: sizes bounded before any work (resolution, memory,
disk), a resume refused when a source it prepared has changed, 16-bit PNGs rounded as meta.json says, and a folder
that holds no VAE named, with no temporary folder left behind by a failed encoding."""

import json
import os
import shutil
import struct
import types
import zlib

import numpy as np
import pytest
from PIL import Image

import scm.data.prepare as prep
from scm.data import preprocess as pp
from scm.data.images import load_folder
from scm.data.prepare import MAX_RESOLUTION, prepare
from scm.data.prepared import PreparedWriter, load_prepared
from scm.errors import DataError

from conftest import cli, make_shapes


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _no_work(monkeypatch):
    """Make any listing, decoding or writing an error: the checks under test must come first."""
    def refuse(*a, **k):
        raise AssertionError("work started before the sizes were checked")

    monkeypatch.setattr(prep, "list_images", refuse)
    monkeypatch.setattr(pp, "preprocess_image", refuse)
    monkeypatch.setattr(PreparedWriter, "append", refuse)


def _tiny_folder(root, n=3, size=(20, 20)):
    for i in range(n):
        root.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (i, 2 * i, 3 * i)).save(root / f"{i}.png")
    return root


# -- 1. sizes are bounded before any work ---------------------------------------------------------------------------
def test_a_resolution_past_the_maximum_is_refused_before_any_work(tmp_path, monkeypatch):
    src = _tiny_folder(tmp_path / "imgs")
    _no_work(monkeypatch)
    code, text = cli("data", "prepare", "--data", src, "--out", tmp_path / "out", "--resolution", 100000)
    assert code == 2 and "Traceback" not in text, text
    assert f"--resolution 100000: at most {MAX_RESOLUTION} pixels a side" in text and "30.0 GB" in text, text
    assert _names(tmp_path) == ["imgs"]  # no output, no partial directory
    with pytest.raises(DataError, match="at most 8192") as e:
        prepare(src, tmp_path / "out", resolution=MAX_RESOLUTION + 1, progress=False)
    assert e.value.key == "resolution"


def test_memory_bounds_the_chunk_and_refuses_what_cannot_fit(tmp_path, monkeypatch):
    """Estimate 2·chunk·C·R² + threads·16·R² bytes within half the available memory: R = 128, C = 3 is 96 kB a
    chunk item and 256 kB a thread. 2 MiB available → 2 threads and chunks of 5; 500 kB → not even one image."""
    src = _tiny_folder(tmp_path / "imgs", n=12)
    full = load_prepared(prepare(src, tmp_path / "full", resolution=128, workers=2, progress=False))
    sizes, append = [], PreparedWriter.append

    def recording(self, images, *a, **k):
        sizes.append(len(images))
        return append(self, images, *a, **k)

    monkeypatch.setattr(PreparedWriter, "append", recording)
    monkeypatch.setattr(prep, "available_memory", lambda: 2 * 2 ** 20)
    messages = []
    small = load_prepared(prepare(src, tmp_path / "small", resolution=128, workers=2, progress=False,
                                  log=messages.append))
    assert sizes == [5, 5, 2] and "prepared 5 at a time in 2 thread(s)" in messages[0], (sizes, messages)
    assert np.array_equal(small.gather(np.arange(12)).numpy(), full.gather(np.arange(12)).numpy())
    monkeypatch.setattr(prep, "available_memory", lambda: 500_000)
    _no_work(monkeypatch)
    with pytest.raises(DataError, match=r"resolution=128: .* needs about 360\.4 kB of memory even one at a time, "
                                        r"but 500\.0 kB is available") as e:
        prepare(src, tmp_path / "none", resolution=128, progress=False)
    assert e.value.key == "resolution" and not (tmp_path / "none.partial").exists()


def _free(monkeypatch, free: int):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=free, used=0, free=free))


def test_the_output_must_fit_on_its_disk(tmp_path, monkeypatch):
    # the writer: a preallocation past the free space (a 786 TB sparse file) is refused before anything is made
    with pytest.raises(DataError, match=r"10\d+ item\(s\) of 3×512×512 uint8 need 786\.4 TB") as e:
        PreparedWriter(tmp_path / "huge", (3, 512, 512), "uint8", 10 ** 9, labelled=False, key="k")
    assert e.value.key == "out" and _names(tmp_path) == []
    # prepare: 3 images at 64×64 (1 channel at least: 12.3 kB) with 10 kB free, before an image is opened
    src = _tiny_folder(tmp_path / "imgs")
    _free(monkeypatch, 10_000)
    monkeypatch.setattr(pp, "open_image", lambda *a, **k: pytest.fail("an image was opened"))
    code, text = cli("data", "prepare", "--data", src, "--out", tmp_path / "out", "--resolution", 64)
    assert code == 2 and "--out:" in text and "3 image(s) of 1×64×64 need 12.3 kB of disk space" in text, text
    assert "10.0 kB is free" in text and _names(tmp_path) == ["imgs"]


# -- 2. a resume onto changed sources is refused, naming the file ---------------------------------------------------
def _bmp_folder(root, n=24):
    """Uncompressed BMPs: another content of the same image size has the same file size."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:02d}.bmp")
    return sorted(root.rglob("*.bmp"))


def _rewrite_keeping_size_and_time(path, seed):
    st = path.stat()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_resume_onto_changed_sources_is_refused_naming_the_file(tmp_path, monkeypatch):
    files = _bmp_folder(tmp_path / "imgs")
    kw = dict(resolution=16, channels=3, chunk=8, progress=False)
    append, calls = PreparedWriter.append, []

    def crash_after_two_chunks(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return append(self, *a, **k)

    monkeypatch.setattr(PreparedWriter, "append", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "imgs", tmp_path / "out", **kw)
    monkeypatch.setattr(PreparedWriter, "append", append)
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "progress.json").read_text())["consumed"] == 16
    original = files[5].read_bytes()
    _rewrite_keeping_size_and_time(files[5], 1)  # prepared already: same name, size and mtime, other pixels
    with pytest.raises(DataError, match=rf"{files[5].name}: changed since an interrupted run prepared it") as e:
        prepare(tmp_path / "imgs", tmp_path / "out", **kw)
    assert e.value.key == "src" and "1 of the 16 file(s)" in str(e.value) and partial.is_dir()
    code, text = cli("data", "prepare", "--data", tmp_path / "imgs", "--out", tmp_path / "out", "--resolution", 16,
                     "--channels", 3, "--no-progress")
    assert code == 2 and f"--data: {files[5]}: changed since" in text and "Traceback" not in text, text
    # the content back (a new mtime: touched, not changed), and a file not yet prepared changed: it continues
    files[5].write_bytes(original)
    _rewrite_keeping_size_and_time(files[20], 2)
    resumed = prepare(tmp_path / "imgs", tmp_path / "out", **kw)
    fresh = prepare(tmp_path / "imgs", tmp_path / "fresh", **kw)
    assert (resumed / "images.bin").read_bytes() == (fresh / "images.bin").read_bytes()
    assert _names(resumed) == ["images.bin", "labels.bin", "meta.json"]  # the digests stayed in the partial


# -- 3. 16-bit PNGs: round(v / 257), as meta.json says ----------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(path, v, colour_type: int, trns: bytes = b""):
    """A 16-bit PNG written by hand (Pillow writes no 16-bit colour), its rows filtered with PNG's five filters in
    turn (none, sub, up, average, Paeth)."""
    h = v.shape[0]
    raw = np.ascontiguousarray(v.astype(">u2")).view(np.uint8).reshape(h, -1).astype(np.int64)
    bpp, prev, rows = 2 * (v.shape[2] if v.ndim == 3 else 1), np.zeros(raw.shape[1], np.int64), []
    for y, x in enumerate(raw):
        a, b = np.concatenate([np.zeros(bpp, np.int64), x[:-bpp]]), prev
        c = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        p = a + b - c
        paeth = np.where((abs(p - a) <= abs(p - b)) & (abs(p - a) <= abs(p - c)), a,
                         np.where(abs(p - b) <= abs(p - c), b, c))
        pred = [0 * x, a, b, (a + b) // 2, paeth][y % 5]
        rows.append(bytes([y % 5]) + ((x - pred) % 256).astype(np.uint8).tobytes())
        prev = x
    header = struct.pack(">IIBBBBB", v.shape[1], h, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + (trns and _chunk(b"tRNS", trns))
                     + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b""))


def test_sixteen_bit_pngs_are_rounded_from_all_16_bits(tmp_path):
    v = np.arange(65536, dtype=np.int64).reshape(256, 256)  # every 16-bit value once
    want = (v + 128) // 257
    assert np.array_equal(want, np.round(v / 257)) and np.array_equal(want, (v * 255 + 32767) // 65535)
    planes = np.stack([v, 65535 - v, v * 7919 % 65536, v[::-1]], axis=2)  # four permutations of all values
    _png16(tmp_path / "imgs" / "a_grey.png", v, 0)
    _png16(tmp_path / "imgs" / "b_rgb.png", planes[:, :, :3], 2)
    _png16(tmp_path / "imgs" / "c_rgba.png", planes, 6)
    _png16(tmp_path / "imgs" / "d_grey_alpha.png", planes[:, :, 1:3], 4)
    data = load_prepared(prepare(tmp_path / "imgs", tmp_path / "out", resolution=256, channels=3, alpha="drop",
                                 progress=False))
    assert data.meta["preprocessing"]["sixteen_bit"] == "round(v / 257)"
    x = data.gather(np.arange(4)).numpy().transpose(0, 2, 3, 1).astype(np.int64)
    eight = (planes + 128) // 257
    for i, expected in enumerate([np.stack([want] * 3, axis=2), eight[:, :, :3], eight[:, :, :3],
                                  np.stack([eight[:, :, 1]] * 3, axis=2)]):
        assert np.array_equal(x[i], expected), (i, np.argwhere(x[i] != expected)[:3])
    # the same rule for a folder read into memory (load_folder)
    for name, expected in (("a_grey.png", want[:, :, None]), ("b_rgb.png", eight[:, :, :3])):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "imgs" / name, tmp_path / name)
        assert np.array_equal(load_folder(tmp_path / name).images[0].numpy().transpose(1, 2, 0), expected), name


def test_sixteen_bit_grey_alpha_and_transparent_colour(tmp_path):
    v = np.array([[0, 1000, 40000, 65535]], np.int64)
    _png16(tmp_path / "ga" / "a.png", np.stack([v, 65535 - v], axis=2), 4)
    _png16(tmp_path / "ga" / "b.png", v, 0)
    data = load_prepared(prepare(tmp_path / "ga", tmp_path / "ga_out", resolution=4, alpha="drop", progress=False))
    assert data.channels == 1  # 16-bit grey + alpha is greyscale (Pillow opens it as RGBA)
    rgb = np.array([[[1000, 2000, 3000], [1000, 2000, 3001]]], np.int64)
    _png16(tmp_path / "t" / "t.png", rgb, 2, trns=struct.pack(">HHH", 1000, 2000, 3000))
    arr = pp.to_array(pp.open_image(tmp_path / "t" / "t.png"), 3, "white")
    assert arr.tolist() == [[[255, 255, 255], [4, 8, 12]]]  # the key colour matched on all 16 bits → white


# -- 4. encode: a folder that holds no VAE is named; a failed encoding leaves no temporary folder ----------------------
diffusers = pytest.importorskip("diffusers", reason="the encoding tests need diffusers: pip install scm[latent]")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """root/vae (a tiny AutoencoderKL), root/unet (a tiny UNet2DModel), root/pixels.npz (16 labelled 32×32×3)."""
    import torch

    from conftest import save_tiny_vae

    root = tmp_path_factory.mktemp("models")
    save_tiny_vae(root / "vae")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                          layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          norm_num_groups=8).save_pretrained(root / "unet")
    images, labels = make_shapes(16, res=32, channels=3)
    np.savez(root / "pixels.npz", x=images, y=labels)
    return root


def test_a_folder_that_holds_no_vae_is_named_before_any_work(models, tmp_path):
    from scm.data.latents import encode

    with pytest.raises(DataError, match=r"unet: holds a UNet2DModel \(config\.json's _class_name\), not an "
                                        "AutoencoderKL") as e:
        encode(models / "pixels.npz", models / "unet", tmp_path / "lat", progress=False)
    assert e.value.key == "vae" and _names(tmp_path) == []
    pipeline = tmp_path / "pipe"
    shutil.copytree(models / "unet", pipeline / "vae")  # a pipeline folder whose vae/ holds something else
    (pipeline / "model_index.json").write_text("{}")
    code, text = cli("data", "encode", "--vae", pipeline, "--data", models / "pixels.npz", "--out", tmp_path / "lat",
                     "--resolution", 32, "--no-progress")
    assert code == 2 and f"--vae: VAE {pipeline / 'vae'}: holds a UNet2DModel" in text and "Traceback" not in text
    assert _names(tmp_path) == ["pipe"]  # not even OUT-images
    wrong = tmp_path / "wrong"  # an AutoencoderKL config over a UNet's weights
    shutil.copytree(models / "unet", wrong)
    shutil.copy(models / "vae" / "config.json", wrong)
    with pytest.raises(DataError, match=r"wrong: its weights are not those of its AutoencoderKL config"):
        encode(models / "pixels.npz", wrong, tmp_path / "lat", progress=False)
    with pytest.raises(DataError, match="dtype='uint8': latents are stored as float16 or float32"):
        encode(models / "pixels.npz", models / "vae", tmp_path / "lat", dtype="uint8", progress=False)
    assert _names(tmp_path) == ["pipe", "wrong"]


def test_a_failed_encoding_keeps_only_the_progress_it_made(models, tmp_path, monkeypatch):
    """An error mid-encoding removes the partial folders with nothing finished and keeps those with progress, from
    which the same command continues to the result of an encoding that never failed."""
    import scm.data.latents as latents

    encode_batch, calls = latents._encode_batch, []

    def failing(*a, **k):  # the device fails on the third batch: the scratch holds two, the output nothing
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return encode_batch(*a, **k)

    monkeypatch.setattr(latents, "_encode_batch", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        latents.encode(models / "pixels.npz", models / "vae", tmp_path / "lat", batch=4, progress=False)
    assert _names(tmp_path) == ["lat.raw.partial"]
    monkeypatch.setattr(latents, "_encode_batch", encode_batch)
    append = PreparedWriter.append

    def full_disk(self, images, *a, **k):  # while normalising into the output, after its first chunk
        if self.dtype == "float16" and self.written:
            raise OSError(28, "No space left on device")
        return append(self, images, *a, **k)

    monkeypatch.setattr(PreparedWriter, "append", full_disk)
    with pytest.raises(OSError, match="No space left"):
        latents.encode(models / "pixels.npz", models / "vae", tmp_path / "lat", batch=4, progress=False)
    assert _names(tmp_path) == ["lat.partial", "lat.raw.partial"]
    monkeypatch.setattr(PreparedWriter, "append", append)
    latents.encode(models / "pixels.npz", models / "vae", tmp_path / "lat", batch=4, progress=False)
    latents.encode(models / "pixels.npz", models / "vae", tmp_path / "straight", batch=4, progress=False)
    assert _names(tmp_path) == ["lat", "straight"]
    for name in ("images.bin", "labels.bin"):
        assert (tmp_path / "lat" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    # images prepared first (OUT-images): a bad file fails before anything is finished: nothing is left
    _tiny_folder(tmp_path / "jpegs", size=(40, 36))
    (tmp_path / "jpegs" / "000.png").write_bytes(b"junk")
    code, text = cli("data", "encode", "--vae", models / "vae", "--data", tmp_path / "jpegs", "--out",
                     tmp_path / "lat2", "--resolution", 32, "--no-progress")
    assert code == 2 and "000.png: cannot decode image" in text, text
    assert _names(tmp_path) == ["jpegs", "lat", "straight"]
    # a partial folder of another encoding is not this one's to remove
    PreparedWriter(tmp_path / "lat3", (4, 16, 16), "float16", 16, labelled=True, key="another")
    with pytest.raises(DataError, match="something else"):
        latents.encode(models / "pixels.npz", models / "vae", tmp_path / "lat3", batch=4, progress=False)
    assert "lat3.partial" in _names(tmp_path)
