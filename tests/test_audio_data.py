"""Audio data: WAV/FLAC folders → prepared [N, C, L] sets (values, labels, meta exact for lossless files),
resampling against the analytic signal, padding/cutting, channels, modality detection and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scm.data import load_dataset
from scm.data.audio import resample
from scm.data.prepare import prepare, source_modality
from scm.data.prepared import load_prepared
from scm.errors import DataError

sf = pytest.importorskip("soundfile")
RATE = 16000


def _pcm(seed: int, n: int, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32768, (n, channels)).astype(np.int16)


def _folder(root, fmt: str = "WAV", lengths=(RATE, RATE), channels: int = 1) -> dict:
    """Two classes of int16 noise clips; returns {relative path: int16 [L, C]}."""
    written = {}
    for c, name in enumerate(("one", "zero")):
        (root / name).mkdir(parents=True)
        for i, n in enumerate(lengths):
            x = _pcm(10 * c + i, n, channels)
            path = root / name / f"{i}.{fmt.lower()}"
            sf.write(path, x, RATE, format=fmt, subtype="PCM_16")
            written[f"{name}/{path.name}"] = x
    return written


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_lossless_files_round_trip_exactly(tmp_path, fmt):
    written = _folder(tmp_path / "src", fmt, channels=2)
    data = load_prepared(prepare(tmp_path / "src", tmp_path / "out", progress=False))
    assert data.meta["modality"] == "audio" and data.meta["sample_rate"] == RATE and data.modality == "audio"
    assert data.shape == (2, RATE) and data.class_names == ["one", "zero"] and data.media == {"sample_rate": RATE}
    x, cond = data.batch(torch.arange(len(data)))
    assert x.dtype == torch.float32 and x.shape == (4, 2, RATE) and float(x.abs().max()) <= 1
    for i, (name, pcm) in enumerate(sorted(written.items())):
        # 16-bit PCM is read as v / 32768, exactly representable in float32: the comparison is exact
        assert torch.equal(x[i], torch.from_numpy(pcm.T.astype(np.float32) / 32768)), name
    assert cond["labels"].tolist() == [0, 0, 1, 1]
    assert "audio clips of 16000 samples (1 s at 16000 Hz), 2 channel(s)" in data.describe()


def test_length_pads_with_silence_at_the_end_and_cuts(tmp_path):
    written = _folder(tmp_path / "src", lengths=(8000, 12000))
    longest = load_prepared(prepare(tmp_path / "src", tmp_path / "pad", progress=False, log=lambda m: None))
    assert longest.shape == (1, 12000)
    short = longest.gather([0]).numpy()[0, 0]
    assert np.array_equal(short[:8000], written["one/0.wav"][:, 0] / 32768) and not short[8000:].any()
    cut = load_prepared(prepare(tmp_path / "src", tmp_path / "cut", length=4000, channels=2, progress=False))
    assert cut.shape == (2, 4000)
    y = cut.gather([1]).numpy()[0]
    assert np.array_equal(y[0], written["one/1.wav"][:4000, 0] / 32768) and np.array_equal(y[0], y[1])  # mono → both


def test_resampling_against_the_analytic_signal():
    # A 440 Hz sine at 16 kHz resampled to 8 kHz (and 11025 Hz, a non-integer ratio) must equal the sine sampled
    # at the new rate: the Kaiser-windowed sinc passes 440 Hz with a ripple far below 1e-3; the first and last 30
    # ms are left out (the signal is taken as zero outside the clip, so the edges ring).
    t = np.arange(RATE) / RATE
    x = np.sin(2 * np.pi * 440 * t)[None].astype(np.float32)
    for rate in (8000, 11025, 22050):
        y = resample(x, RATE, rate)
        assert y.shape == (1, round(RATE * rate / RATE))
        ref = np.sin(2 * np.pi * 440 * np.arange(y.shape[1]) / rate)
        edge = int(0.03 * rate)
        assert np.abs(y[0, edge:-edge] - ref[edge:-edge]).max() < 2e-3, rate
    # 7 kHz is above the 4 kHz Nyquist frequency of 8 kHz: removed (not aliased to 1 kHz)
    high = resample(np.sin(2 * np.pi * 7000 * t)[None], RATE, 8000)
    assert np.abs(high[0, 300:-300]).max() < 1e-2


def test_mono_mixdown_and_resampled_folder(tmp_path):
    _folder(tmp_path / "src", channels=2)
    data = load_prepared(prepare(tmp_path / "src", tmp_path / "out", channels=1, sample_rate=8000, progress=False))
    assert data.shape == (1, 8000) and data.meta["sample_rate"] == 8000
    assert data.meta["preprocessing"]["channels"] == "mean"


def test_bad_files_and_settings_are_named(tmp_path):
    _folder(tmp_path / "src")
    bad = tmp_path / "src" / "one" / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00not a wave file")
    with pytest.raises(DataError, match=r"broken.wav: cannot read audio") as e:
        prepare(tmp_path / "src", tmp_path / "out", progress=False)
    assert e.value.key == "skip_bad"
    data = load_prepared(prepare(tmp_path / "src", tmp_path / "out", skip_bad=True, progress=False))
    assert len(data) == 4 and data.meta["skipped_count"] == 1
    bad.unlink()
    sf.write(tmp_path / "src" / "zero" / "fast.wav", _pcm(9, 100), 22050)
    with pytest.raises(DataError, match=r"sample rate 22050.*set sample_rate") as e:
        prepare(tmp_path / "src", tmp_path / "o2", progress=False)
    assert e.value.key == "sample_rate"
    with pytest.raises(DataError, match=r"audio has none") as e:
        prepare(tmp_path / "src", tmp_path / "o3", resolution=32, progress=False)
    with pytest.raises(DataError, match=r"frames: a setting of video, but the source is audio"):
        prepare(tmp_path / "src", tmp_path / "o3", frames=4, progress=False)


def test_mixed_folders_are_refused(tmp_path):
    _folder(tmp_path / "src")
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "src" / "one" / "x.png")
    with pytest.raises(DataError, match=r"mixes image files.*and audio files") as e:
        source_modality(tmp_path / "src")
    assert e.value.key == "src"


def test_cli_prepare_and_info(tmp_path):
    from typer.testing import CliRunner

    from scm.app.cli import app

    _folder(tmp_path / "src")
    out = CliRunner().invoke(app, ["data", "prepare", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "p"),
                                   "--no-progress"])
    assert out.exit_code == 0, out.output
    info = CliRunner().invoke(app, ["data", "info", str(tmp_path / "p")])
    assert "audio clips of 16000 samples" in info.output
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["modality"] == "audio" and meta["shape"] == [1, RATE]
    assert load_dataset(tmp_path / "p").modality == "audio"
    bad = CliRunner().invoke(app, ["data", "prepare", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "q"),
                                   "--resolution", "8"])
    assert bad.exit_code == 2 and "--resolution 8: audio has none" in bad.output
