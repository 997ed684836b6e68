"""scm.data.spoken_digits: digits spoken by espeak-ng, resampled, trimmed, centred in 1 s, normalised, seeded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import wave

import numpy as np
import pytest

from scm.data import spoken_digits as sd
from scm.data.spoken_digits import ClipSpec, MissingProgram
from scm.errors import DataError, InvalidSetting


def _espeak_or_skip() -> None:
    """CI installs espeak-ng (Makefile `test`); where it is missing and this user may install Debian packages
    (root, as in CI containers), install it; otherwise skip, saying why."""
    if shutil.which("espeak-ng") is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "espeak-ng"], capture_output=True, check=False, timeout=300)
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed and could not be installed here: apt-get install espeak-ng")


@pytest.fixture(scope="module")
def espeak():
    _espeak_or_skip()


@pytest.fixture(scope="module")
def two_per_digit(espeak, tmp_path_factory):
    return sd.synthesise_spoken_digits(tmp_path_factory.mktemp("digits") / "set", per_digit=2, seed=3)


def _read(path) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        return w.getparams(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def test_clips_are_16khz_mono_one_second_centred_and_peak_normalised(two_per_digit):
    assert sorted(p.name for p in two_per_digit.iterdir()) == [*map(str, range(10)), "synthesis.json"]
    for digit in range(10):
        assert sorted(p.name for p in (two_per_digit / str(digit)).iterdir()) == ["0.wav", "1.wav"]
        for i in range(2):
            params, samples = _read(two_per_digit / str(digit) / f"{i}.wav")
            assert (params.nchannels, params.sampwidth, params.framerate, params.nframes) == (1, 2, 16_000, 16_000)
            assert np.abs(samples).max() == round(sd.PEAK * 32767)
            sound = np.flatnonzero(samples)
            # the word sits in the middle: the trim keeps whole 10 ms frames, whose edge samples may round to 0
            assert abs(int(sound[0]) - (16_000 - 1 - int(sound[-1]))) <= 2 * 160
            assert 0.15 * 16_000 < sound[-1] - sound[0] < 16_000
    manifest = json.loads((two_per_digit / "synthesis.json").read_text())
    assert manifest["sample_rate"] == 16_000 and manifest["program"].startswith("eSpeak NG")
    assert [c["file"] for c in manifest["clips"]] == [f"{d}/{i}.wav" for d in range(10) for i in range(2)]
    assert all(c["voice"].split("+")[0] in sd.VOICES for c in manifest["clips"])


def test_same_seed_gives_the_same_bytes_and_another_seed_other_clips(two_per_digit, tmp_path):
    again = sd.synthesise_spoken_digits(tmp_path / "again", per_digit=2, seed=3, workers=1)
    files = sorted(p.relative_to(two_per_digit) for p in two_per_digit.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((two_per_digit / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert sd.plan_clips(2, 3) != sd.plan_clips(2, 4)


def test_espeak_ng_itself_is_deterministic(espeak):
    first = sd.speak("seven", "en-gb-scotland+f3", 150, 60)
    second = sd.speak("seven", "en-gb-scotland+f3", 150, 60)
    assert first[0] == 22_050 and np.array_equal(first[1], second[1])


def test_distinct_voices_speeds_and_pitches_give_distinct_audio(espeak):
    """Even a one-step change of speed or pitch shifts the waveform's phase (measured correlation with the
    reference ≈ 0 for every change below); 0.5 separates that from a repeat (1.0)."""
    reference = sd.render_clip(ClipSpec(7, "en-us", 170, 50))
    for other in (ClipSpec(7, "en-us+f2", 170, 50), ClipSpec(7, "en-gb-scotland", 170, 50),
                  ClipSpec(7, "en-us", 200, 50), ClipSpec(7, "en-us", 170, 70)):
        assert np.corrcoef(reference, sd.render_clip(other))[0, 1] < 0.5, other
    plan = sd.plan_clips(30, 0)
    assert len(set(plan)) == len(plan) == 300  # no clip repeats another
    assert len({spec.voice for spec in plan}) > 40  # of 8 voices × 12 variants


def test_splits_hold_train_and_test_with_no_shared_clip(espeak, tmp_path):
    train = sd.plan_clips(40, [0, 0])
    assert not set(train) & set(sd.plan_clips(20, [0, 1], exclude=train))
    root = sd.synthesise_spoken_digit_splits(tmp_path / "splits", train_per_digit=1, test_per_digit=1, seed=5)
    for split in ("train", "test"):
        assert len(list((root / split).glob("*/*.wav"))) == 10
        assert json.loads((root / split / "synthesis.json").read_text())["seed"] == [5, split == "test"]
    with pytest.raises(FileExistsError):
        sd.synthesise_spoken_digit_splits(root, train_per_digit=1, test_per_digit=1, seed=5)
    sd.synthesise_spoken_digit_splits(root, train_per_digit=1, test_per_digit=1, seed=6, replace=True)
    assert json.loads((root / "test" / "synthesis.json").read_text())["seed"] == [6, 1]


def test_missing_espeak_ng_is_named_with_its_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH on which no espeak-ng is found
    with pytest.raises(MissingProgram) as e:
        sd.synthesise_spoken_digits(tmp_path / "out", per_digit=1)
    assert e.value.program == "espeak-ng" and "install the Debian package espeak-ng" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_settings_and_voices_are_named(espeak, tmp_path):
    with pytest.raises(InvalidSetting, match="per_digit"):
        sd.synthesise_spoken_digits(tmp_path / "out", per_digit=0)
    with pytest.raises(DataError, match="nosuchvoice"):  # ("no-…" would pick Norwegian)
        sd.speak("one", "nosuchvoice", 170, 50)


def test_resampler_keeps_the_band_and_removes_what_would_alias():
    """A 1 kHz tone at 22,050 Hz resampled to 16 kHz matches the tone sampled at 16 kHz (measured max error
    2.7e-5 away from the ends, where the zero padding of the filter's reach shows); a 10 kHz tone, above the new
    Nyquist frequency of 8 kHz, is removed (measured 5e-5, −86 dB): bounds 1e-4 and 1e-3 (−60 dB)."""
    time = np.arange(22_050) / 22_050
    out = sd.resample(np.sin(2 * np.pi * 1000 * time), 22_050, 16_000)
    assert out.shape == (16_000,)
    expected = np.sin(2 * np.pi * 1000 * np.arange(16_000) / 16_000)
    assert np.abs(out - expected)[200:-200].max() < 1e-4
    aliased = sd.resample(np.sin(2 * np.pi * 10_000 * time), 22_050, 16_000)
    assert np.abs(aliased[200:-200]).max() < 1e-3
    assert sd.resample(np.ones(10), 22_050, 16_000).shape == (8,)  # ceil(10 · 16000 / 22050)


def test_the_built_in_set_is_synthesised_prepared_and_loaded(espeak, tmp_path, monkeypatch):
    """`scm data fetch spoken-digits`' library side: WAV folders, then prepared [1, 16000] clips labelled by digit,
    loaded by name; asking again with the same settings keeps them, with others is refused."""
    from scm.data import load_dataset

    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path))
    paths = sd.fetch_spoken_digits(train_per_digit=2, test_per_digit=1, log=lambda m: None)
    train, test = load_dataset("spoken-digits"), load_dataset("spoken-digits:test")
    assert len(train) == 20 and len(test) == 10 and train.shape == (1, 16000) and train.modality == "audio"
    assert train.media == {"sample_rate": 16000} and train.num_classes == 10
    x, cond = train.batch(np.arange(20))
    assert float(x.abs().max()) == pytest.approx(0.9, abs=1e-3)  # peak-normalised clips, read back as floats
    assert sorted(cond["labels"].tolist()) == sorted(list(range(10)) * 2)
    assert sd.fetch_spoken_digits(train_per_digit=2, test_per_digit=1, log=lambda m: None) == paths
    with pytest.raises(DataError, match="remove it"):
        sd.fetch_spoken_digits(train_per_digit=3, test_per_digit=1, log=lambda m: None)
