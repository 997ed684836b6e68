"""Video data: GIF, MP4 and frame folders → prepared [N, C, T, R, R] sets (values, labels and meta against the
frames written), clip cutting and frame-rate resampling, resuming, Moving MNIST (determinism, bounce physics,
records), old sets without a modality, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scm.data import ImageData, load_dataset
from scm.data.moving_mnist import clip_digits, fetch_moving_mnist, render, trajectories
from scm.data.prepare import prepare, source_modality
from scm.data.prepared import PreparedWriter, load_prepared
from scm.errors import DataError


def _frames(seed: int, n: int, size: int = 32, channels: int = 1) -> np.ndarray:
    """n distinct random frames uint8 [n, size, size(, 3)]."""
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _gif_folder(root, lengths=(6, 7)) -> dict:
    """Greyscale GIF clips in two class folders; {relative path: uint8 [T, 32, 32]}."""
    written = {}
    for c, name in enumerate(("bounce", "spin")):
        (root / name).mkdir(parents=True)
        for i, n in enumerate(lengths):
            x = _frames(10 * c + i, n)
            frames = [Image.fromarray(f) for f in x]
            frames[0].save(root / name / f"{i}.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
            written[f"{name}/{i}.gif"] = x
    return written


def test_gif_clips_in_class_folders_need_only_a_resolution(tmp_path):
    written = _gif_folder(tmp_path / "src")
    assert source_modality(tmp_path / "src") == "video"
    data = load_prepared(prepare(tmp_path / "src", tmp_path / "out", resolution=32, progress=False))
    meta = data.meta
    assert (meta["modality"], meta["fps"], meta["frames"], meta["stride"]) == ("video", 10.0, 6, 6)
    assert data.shape == (1, 6, 32, 32) and data.class_names == ["bounce", "spin"] and len(data) == 4
    x, cond = data.batch(torch.arange(4))
    assert x.shape == (4, 1, 6, 32, 32) and x.dtype == torch.float32 and cond["labels"].tolist() == [0, 0, 1, 1]
    stored = data.gather(np.arange(4)).numpy()
    for i, name in enumerate(sorted(written)):
        # 256 grey levels fit a GIF palette: lossless, so exact; the first 6 frames of each clip (one clip a file)
        assert np.array_equal(stored[i, 0], written[name][:6]), name
    assert torch.allclose(x, torch.from_numpy(stored).float() / 127.5 - 1)
    assert "4 video clips of 6 frames, 32×32, 1 channel(s), 10 fps" in data.describe()


def test_frame_folders_clips_stride_and_resize(tmp_path):
    clip = _frames(3, 7, size=16, channels=3)
    for k, f in enumerate(clip):
        (tmp_path / "src" / "walk").mkdir(parents=True, exist_ok=True)
        Image.fromarray(f).save(tmp_path / "src" / "walk" / f"{k + 1}.png")  # 1 … 7: natural order puts 10 after 9
    assert source_modality(tmp_path / "src") == "image"  # frames look like images unless asked
    data = load_prepared(prepare(tmp_path / "src", tmp_path / "out", resolution=16, modality="video", frames=3,
                                 stride=2, fps=5, progress=False))
    assert len(data) == 3 and data.shape == (3, 3, 16, 16) and data.meta["fps"] == 5 and data.labels is None
    stored = data.gather(np.arange(3)).numpy()
    for j, start in enumerate((0, 2, 4)):
        assert np.array_equal(stored[j], clip[start:start + 3].transpose(3, 0, 1, 2))
    half = load_prepared(prepare(tmp_path / "src", tmp_path / "half", resolution=8, modality="video", frames=7,
                                 channels=1, progress=False))
    # each frame goes through the image rules: the same pixels as preparing the frame as an image
    still = load_prepared(prepare(tmp_path / "src" / "walk", tmp_path / "still", resolution=8, channels=1,
                                  progress=False))
    assert np.array_equal(half.gather([0]).numpy()[0, 0], still.gather(np.arange(7)).numpy()[:, 0])


def _mp4(path, n: int, rate: int, size: int = 48):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(n):
            frame = np.full((size, size, 3), 10 + 20 * k, np.uint8)
            frame[: size // 2, :, 0] = 200  # a red top half
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_mp4_round_trip_within_codec_tolerance_and_fps_resampling(tmp_path):
    (tmp_path / "src").mkdir()
    _mp4(tmp_path / "src" / "a.mp4", 12, rate=12)
    data = load_prepared(prepare(tmp_path / "src", tmp_path / "out", resolution=48, frames=12, progress=False))
    assert data.meta["fps"] == 12 and data.shape == (3, 12, 48, 48)
    x = data.gather([0]).numpy()[0].astype(int)  # [3, T, H, W]
    # H.264 (lossy) with 4:2:0 chroma and an RGB → YUV → RGB round trip: flat areas come back within a few levels
    # (the default quality); the sharp red edge is blurred by the halved chroma, so only the flat bottom half
    # (rows 32…47, away from the edge) is compared per channel
    grey = 10 + 20 * np.arange(12)
    assert np.abs(x[:, :, 32:, :].mean(axis=(2, 3)) - grey[None]).max() < 4
    assert np.abs(x[0, :, :16].mean(axis=(1, 2)) - 200).max() < 6
    resampled = load_prepared(prepare(tmp_path / "src", tmp_path / "r", resolution=16, fps=4, progress=False))
    # 12 frames at 12 fps last 1 s: 4 frames at 4 fps, showing source frames 0, 3, 6, 9
    y = resampled.gather([0]).numpy()[0, 1, :, 12:, :].mean(axis=(1, 2))
    assert resampled.shape == (3, 4, 16, 16) and np.abs(y - grey[[0, 3, 6, 9]]).max() < 4


def test_interrupted_video_preparation_resumes_byte_identical(tmp_path, monkeypatch):
    _gif_folder(tmp_path / "src", lengths=(9, 9))
    whole = load_prepared(prepare(tmp_path / "src", tmp_path / "whole", resolution=16, frames=3, chunk=2,
                                  progress=False))
    calls = {"n": 0}
    real = PreparedWriter.append

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(PreparedWriter, "append", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "src", tmp_path / "again", resolution=16, frames=3, chunk=2, progress=False)
    monkeypatch.setattr(PreparedWriter, "append", real)
    assert json.loads((tmp_path / "again.partial" / "progress.json").read_text())["written"] == 4
    again = load_prepared(prepare(tmp_path / "src", tmp_path / "again", resolution=16, frames=3, chunk=2,
                                  progress=False))
    assert len(again) == len(whole) == 12
    assert (tmp_path / "again" / "images.bin").read_bytes() == (tmp_path / "whole" / "images.bin").read_bytes()
    assert again.labels.tolist() == whole.labels.tolist()


def test_bad_video_input_is_named(tmp_path):
    _gif_folder(tmp_path / "src")
    (tmp_path / "src" / "spin" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(DataError, match=r"broken.mp4: cannot read video") as e:
        prepare(tmp_path / "src", tmp_path / "out", resolution=32, progress=False)
    assert e.value.key == "skip_bad"
    data = load_prepared(prepare(tmp_path / "src", tmp_path / "out", resolution=32, skip_bad=True, progress=False))
    assert len(data) == 4 and data.meta["skipped_count"] == 1 and "broken.mp4" in data.meta["skipped"][0]["file"]
    (tmp_path / "src" / "spin" / "broken.mp4").unlink()
    frames = [Image.fromarray(f) for f in _frames(5, 6)]
    frames[0].save(tmp_path / "src" / "spin" / "slow.gif", save_all=True, append_images=frames[1:], duration=250)
    with pytest.raises(DataError, match=r"slow.gif: 4 frames per second.*set fps") as e:
        prepare(tmp_path / "src", tmp_path / "o2", resolution=32, progress=False)
    assert e.value.key == "fps"
    with pytest.raises(DataError, match=r"video needs a resolution"):
        prepare(tmp_path / "src", tmp_path / "o3", progress=False)
    with pytest.raises(DataError, match=r"no source has 50 frames") as e:
        prepare(tmp_path / "src", tmp_path / "o3", resolution=32, frames=50, fps=10, progress=False)
    (tmp_path / "src" / "a.wav").write_bytes(b"RIFF")
    with pytest.raises(DataError, match=r"mixes video files.*audio files"):
        prepare(tmp_path / "src", tmp_path / "o4", resolution=32, progress=False)


def test_bounce_physics_of_the_trajectories():
    pos = trajectories(np.random.default_rng(0), 500, 40, 2, step=0.1)
    assert pos.min() >= 0 and pos.max() <= 1
    step = np.diff(pos, axis=1)
    free = ((pos[:, 1:] > 0) & (pos[:, 1:] < 1) & (pos[:, :-1] > 0) & (pos[:, :-1] < 1)).all(axis=-1)
    # between walls each digit moves 0.1 a frame in a straight line (the same step, frame after frame)
    assert np.allclose(np.linalg.norm(step, axis=-1)[free], 0.1)
    straight = free[:, 1:] & free[:, :-1]
    assert np.allclose(step[:, 1:][straight], step[:, :-1][straight])
    # a digit at a wall turns back: the coordinate's next step has the opposite sign
    y = pos[..., 0]
    at_wall = (y[:, 1:-1] == 0) | (y[:, 1:-1] == 1)
    before, after = np.diff(y, axis=1)[:, :-1], np.diff(y, axis=1)[:, 1:]
    turns = at_wall & (before != 0)
    assert turns.sum() > 100 and (np.sign(before[turns]) == -np.sign(after[turns])).all()


def test_rendered_digits_stay_inside_the_frame():
    digits = np.random.default_rng(1).integers(1, 256, (50, 1, 14, 14), dtype=np.uint8)
    pos = trajectories(np.random.default_rng(2), 50, 30, 1)
    clips = render(digits, pos, 32)
    # every pixel of the digit is drawn in every frame: the frame's sum is the digit's
    assert (clips.reshape(50, 30, -1).sum(-1, dtype=np.int64) == digits.reshape(50, 1, -1).sum(-1)).all()


def test_moving_mnist_tiny_is_deterministic_and_loads_like_mnist(tmp_path, real_mnist, monkeypatch):
    import shutil

    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    shutil.copytree(f"{real_mnist}/mnist", tmp_path / "data" / "mnist")
    with pytest.raises(DataError, match=r"moving-mnist-tiny is not generated") as e:
        load_dataset("moving-mnist-tiny")
    assert e.value.key == "moving-mnist-tiny"
    counts = {"train": 300, "test": 50}
    paths = fetch_moving_mnist("moving-mnist-tiny", clips=counts, seed=3, log=lambda m: None)
    shutil.copytree(f"{real_mnist}/mnist", tmp_path / "other" / "mnist")
    again = fetch_moving_mnist("moving-mnist-tiny", tmp_path / "other", clips=counts, seed=3, log=lambda m: None)
    read = {k: (p / "images.bin").read_bytes() for k, p in paths.items()}
    assert read == {k: (p / "images.bin").read_bytes() for k, p in again.items()}  # the same seed, the same bytes
    data, test = load_dataset("moving-mnist-tiny"), load_dataset("moving-mnist-tiny:test")
    assert (len(data), len(test)) == (300, 50) and data.shape == (1, 8, 32, 32) and data.modality == "video"
    classes, index = clip_digits(paths["train"])
    assert classes.shape == (300, 1) and data.labels.tolist() == classes[:, 0].tolist()
    mnist = np.load(tmp_path / "data" / "mnist" / "mnist.npz")
    assert (mnist["y_train"][index[:, 0]] == classes[:, 0]).all()
    x = data.gather(np.arange(300)).numpy().astype(np.int64)
    # the digit (box-filtered to 14×14) is whole in every frame: each frame's sum is the small digit's sum
    small = mnist["x_train"][index[:, 0]].astype(np.int64).reshape(300, 14, 2, 14, 2).sum(axis=(2, 4))
    assert (x.reshape(300, 8, -1).sum(-1) == ((small + 2) // 4).reshape(300, -1).sum(-1)[:, None]).all()
    with pytest.raises(DataError, match=r"remove it to generate it again"):
        fetch_moving_mnist("moving-mnist-tiny", clips={"train": 301}, seed=3, log=lambda m: None)


def test_old_sets_read_as_images_and_modality_must_fit_the_shape(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=images)
    path = prepare(tmp_path / "a.npz", tmp_path / "p", resolution=8, progress=False)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["modality"] == "image"
    del meta["modality"]
    (path / "meta.json").write_text(json.dumps(meta))
    old = load_prepared(path)
    assert old.modality == "image" and old.media is None and old.shape == (1, 8, 8)
    meta["modality"] = "video"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta.json: video items need 4 dimensions"):
        load_prepared(path)


def test_video_and_audio_in_memory():
    clips = torch.randint(0, 256, (3, 1, 4, 8, 8), dtype=torch.uint8)
    data = ImageData(clips, torch.tensor([0, 1, 0]), "clips", media={"fps": 8.0})
    assert data.modality == "video" and data.media == {"fps": 8.0, "frames": 4, "stride": 4}
    x, _ = data.batch(torch.tensor([2, 0]))
    assert x.shape == (2, 1, 4, 8, 8) and torch.equal(x[0], clips[2].float() / 127.5 - 1)
    assert "3 video clips of 4 frames, 8×8, 1 channel(s), 8 fps" in data.describe()
    sound = ImageData(torch.rand(2, 2, 100) * 2 - 1, None, "tones", value_range="raw", media={"sample_rate": 100})
    assert sound.modality == "audio" and sound.batch(torch.tensor([1]))[0].shape == (1, 2, 100)
    with pytest.raises(DataError, match=r"sample_rate"):
        ImageData(torch.zeros(2, 1, 100), None, "tones", value_range="raw")
