"""scm.media: clips and audio written as GIF, MP4, WAV and spectrogram PNGs, read back with Pillow, PyAV and wave."""

from __future__ import annotations

import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from scm import media
from scm.errors import InvalidSetting, MissingDependency
from scm.images import grid


def _gif_frames(path, mode: str) -> tuple[list[np.ndarray], Image.Image]:
    image = Image.open(path)
    return [np.array(frame.convert(mode)) for frame in ImageSequence.Iterator(image)], image


def _palette_clip(seed: int = 0) -> torch.Tensor:
    """An RGB clip [3, 5, 7, 9] with 4 levels per channel (64 colours, fewer than a GIF palette's 256), whose
    frames all differ (Pillow merges a frame identical to the one before it)."""
    levels = torch.randint(0, 4, (3, 5, 7, 9), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 3 * 2 - 1


def _no_temporaries(folder) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_gif_of_a_palette_friendly_clip_has_its_exact_frames(tmp_path):
    clip = _palette_clip()
    media.save_gif(clip, tmp_path / "clip.gif", fps=10)
    frames, image = _gif_frames(tmp_path / "clip.gif", "RGB")
    expected = media.to_frames(clip)
    assert expected.shape == (5, 7, 9, 3)
    assert len(frames) == 5 and all(np.array_equal(a, b) for a, b in zip(frames, expected, strict=True))
    assert image.info["loop"] == 0 and image.info["duration"] == 100
    assert _no_temporaries(tmp_path)


def test_gif_of_a_greyscale_clip_is_exact_for_any_values(tmp_path):
    clip = torch.rand(1, 4, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    media.save_gif(clip, tmp_path / "grey.gif")
    frames, _ = _gif_frames(tmp_path / "grey.gif", "L")
    expected = media.to_frames(clip)[..., 0]
    assert len(frames) == 4 and all(np.array_equal(a, b) for a, b in zip(frames, expected, strict=True))


def test_gif_grid_puts_clips_side_by_side_frame_by_frame(tmp_path):
    clips = torch.stack([_palette_clip(seed) for seed in range(3)])  # [3, 3, 5, 7, 9]
    frames = media.video_grid(clips, nrow=3, pad=1, scale=2)
    assert frames.shape == (5, 2 * 7 + 2, 3 * 2 * 9 + 4, 3)
    for t in range(5):  # frame t is the image grid of the clips' frame t
        assert np.array_equal(frames[t], grid(clips[:, :, t], nrow=3, pad=1, scale=2))
    media.save_gif_grid(clips, tmp_path / "grid.gif", nrow=3, scale=2)
    read, _ = _gif_frames(tmp_path / "grid.gif", "RGB")
    assert all(np.array_equal(a, b) for a, b in zip(read, frames, strict=True))


def _smooth_clip(channels: int, t: int = 6, h: int = 15, w: int = 17) -> torch.Tensor:
    """A moving smooth pattern of odd size (the MP4 writer pads it to 16 × 18)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    shift = torch.arange(t).view(t, 1, 1) * 0.1
    planes = [torch.sin(2 * x + shift) * torch.cos(y), torch.cos(y + shift), x * y + shift]
    return (torch.stack(planes[:channels]) * 0.8).clamp(-1, 1)


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
@pytest.mark.parametrize("channels", [1, 3])
def test_mp4_reads_back_close_to_the_clip(tmp_path, codec, channels):
    """Tolerances: H.264 at CRF 17 and MPEG-4 at q 2 are lossy, yuv420p rounds to limited-range 8-bit luma (±1
    level each way) and keeps chroma at half resolution, which on a 15 × 17 colour gradient costs up to ~20 levels
    at edges. Measured: grey max 6 / mean 1.2, colour max 19 / mean 4.2 (of 255); the bounds leave about 1.5×
    margin, while a wrong channel order, a flipped or shifted frame gives errors of 50 and more."""
    av = pytest.importorskip("av", reason="MP4 needs PyAV: pip install scm[video]")
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV's FFmpeg has no {codec} encoder")
    clip = _smooth_clip(channels)
    media.save_mp4(clip, tmp_path / "clip.mp4", fps=8, codec=codec)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 8 and stream.codec_context.name == ("h264" if codec == "libx264" else "mpeg4")
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (6, 16, 18, 3)  # odd sizes padded by one row and one column
    expected = np.repeat(media.to_frames(clip), 3 // channels, axis=3).astype(int)
    error = np.abs(decoded[:, :15, :17].astype(int) - expected)
    max_error, mean_error = (10, 2.0) if channels == 1 else (30, 6.5)
    assert error.max() <= max_error and error.mean() <= mean_error, (error.max(), error.mean())
    assert _no_temporaries(tmp_path)


def test_mp4_without_pyav_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(MissingDependency) as e:
        media.save_mp4(_smooth_clip(1), tmp_path / "clip.mp4")
    assert e.value.extra == "video" and "scm[video]" in str(e.value)
    assert not (tmp_path / "clip.mp4").exists()
    media.save_gif(_smooth_clip(1), tmp_path / "clip.gif")  # GIF needs no extra


def test_wav_round_trips_int16_exactly(tmp_path):
    values = torch.randint(-32767, 32768, (2, 1000), generator=torch.Generator().manual_seed(2))
    media.save_wav(values.double() / 32767, tmp_path / "stereo.wav", sample_rate=16_000)
    with wave.open(str(tmp_path / "stereo.wav"), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, 16_000, 1000)
        read = np.frombuffer(w.readframes(1000), dtype="<i2").reshape(1000, 2).T  # interleaved frames
    assert np.array_equal(read, values.numpy())


def test_wav_clips_values_outside_the_range():
    samples = media.to_int16(torch.tensor([[-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]]))
    assert samples.tolist() == [[-32767, -32767, 0, 16384, 32767, 32767]]


def test_spectrogram_grid_shows_a_tone_in_its_frequency_row(tmp_path):
    rate, n_fft = 16_000, 256
    time = torch.arange(rate) / rate
    tone = torch.sin(2 * torch.pi * 1000 * time)  # full scale, exactly on bin 1000 / (16000 / 256) = 16
    audios = torch.stack([torch.stack([tone, tone]), torch.zeros(2, rate), torch.stack([0.02 * tone, 0 * tone])])
    image = media.spectrogram_grid(audios, n_fft=n_fft, hop=64)
    bins, frames = n_fft // 2 + 1, rate // 64 + 1
    assert image.shape == (3 * (bins + 1) + 1, frames + 2, 1) and image.dtype == np.uint8
    rows = [image[1 + i * (bins + 1): 1 + i * (bins + 1) + bins, 1:-1, 0] for i in range(3)]
    middle = rows[0][:, frames // 2]
    assert bins - 1 - int(middle.argmax()) == 16  # frequency runs up: bin k is row bins − 1 − k
    assert middle.max() >= 254  # a full-scale sine is 0 dB (white), up to rounding
    assert rows[1].max() == 0  # silence is black
    quiet = rows[2][:, frames // 2]  # channels averaged: 0.01, −40 dB, 60 dB above the −100 dB floor: 0.6 of white
    assert bins - 1 - int(quiet.argmax()) == 16 and abs(int(quiet.max()) - 153) <= 2
    media.save_spectrogram_grid(audios, tmp_path / "spec.png", scale=2)
    assert np.array(Image.open(tmp_path / "spec.png")).shape == (2 * image.shape[0], 2 * image.shape[1])


def test_bad_shapes_and_settings_are_named(tmp_path):
    with pytest.raises(InvalidSetting, match="clip"):
        media.to_frames(torch.zeros(2, 3, 4, 4))
    with pytest.raises(InvalidSetting, match="clips"):
        media.video_grid(torch.zeros(3, 4, 4, 4))
    with pytest.raises(InvalidSetting, match="frames"):
        media.save_gif(np.zeros((3, 4, 4, 3), dtype=np.float32), tmp_path / "x.gif")
    with pytest.raises(InvalidSetting, match="fps"):
        media.save_gif(_palette_clip(), tmp_path / "x.gif", fps=0)
    with pytest.raises(InvalidSetting, match="audio"):
        media.save_wav(torch.zeros(100), tmp_path / "x.wav", sample_rate=16_000)
    with pytest.raises(InvalidSetting, match="sample_rate"):
        media.encode_wav(torch.zeros(1, 100), sample_rate=0)
    assert not list(tmp_path.iterdir())
