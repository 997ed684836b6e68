"""Audio files (WAV, FLAC, Ogg Vorbis) → a prepared set of audio clips [N, C, L] (`scm.data.prepared`): one clip
per file, float32 samples in [-1, 1] (stored "raw": the model's space as they are).

Reading: `soundfile` (libsndfile, bundled with its wheels: the optional extra `audio`); integer PCM becomes
v / 2^(bits−1) (16-bit: v / 32768, exact in float32), float files are read as they are. A file that cannot be
read is an error naming it (or, with `skip_bad`, skipped and listed in meta.json, as undecodable images are).
Class sub-folders are labels and sidecar .txt files or a metadata.jsonl captions, as for image folders
(`scm.data.prepare.prepare_files` does the writing: resumable, atomic, bounded memory).

Settings (`AudioOptions`), each defaulting to what the files share, so a folder of 16 kHz one-second clips needs
none:
- `sample_rate`: the files' own (they must agree, or it must be given). A file at another rate is resampled by
  band-limited interpolation (`resample`): each output sample is the sum of the input samples weighted by a
  Kaiser-windowed sinc (β = KAISER_BETA, ZERO_CROSSINGS zero crossings a side) whose cut-off is ROLLOFF × the
  lower of the two Nyquist frequencies (no aliasing when downsampling); the signal is taken as zero outside the
  file; a file of L samples becomes round(L · rate_out / rate_in) samples.
- `length` (samples, at the output rate): the longest file's. A shorter clip is padded with silence (zeros) at
  its end, a longer one cut at its end: a clip always starts where its recording starts.
- `channels`: the files' own (they must agree, or it must be given): 1 mixes every channel down to their mean,
  2 duplicates a mono file into both channels (a file with more channels than 2 needs 1).
Values outside [-1, 1] (float files, or the overshoot of resampling) are clipped to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scm.errors import DataError, require_modules

__all__ = ["AUDIO_SUFFIXES", "AudioOptions", "fit_length", "list_audio", "prepare_audio", "read_audio", "resample"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
KAISER_BETA = 8.6  # about 80 dB of stop-band attenuation
ZERO_CROSSINGS = 24
ROLLOFF = 0.94
RULES = 1  # the version of these rules (part of the resume key)
MAX_CHANNELS = 8


@dataclass(frozen=True)
class AudioOptions:
    """The settings of an audio preparation (module docstring); None: what the files share."""

    sample_rate: int | None = None
    length: int | None = None
    channels: int | None = None

    def check(self) -> None:
        for key in ("sample_rate", "length"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DataError(f"{key}={v!r}: must be a positive integer", key=key)
        if self.channels not in (None, 1, 2):
            raise DataError(f"channels={self.channels!r}: audio takes 1 (mono) or 2 (stereo)", key="channels")


def _soundfile():
    return require_modules("reading audio files", "audio", "soundfile")[0]


def list_audio(root: Path) -> list[Path]:
    """Every WAV, FLAC or Ogg file under root (recursive), sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def probe(path: Path) -> tuple[int, int, int]:
    """(sample rate, samples, channels) of an audio file, from its header."""
    sf = _soundfile()
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError, ValueError, TypeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise DataError(f"{path}: cannot read audio ({e})") from None
    if info.samplerate < 1 or info.frames < 1 or not 1 <= info.channels <= MAX_CHANNELS:
        raise DataError(f"{path}: {info.frames} samples of {info.channels} channel(s) at {info.samplerate} Hz; "
                        f"an audio clip needs at least one sample and 1 to {MAX_CHANNELS} channels")
    return int(info.samplerate), int(info.frames), int(info.channels)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(float32 [C, L] samples, sample rate) of an audio file (module docstring)."""
    sf = _soundfile()
    try:
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot read audio ({e})") from None
    if x.size == 0:
        raise DataError(f"{path}: no audio samples")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: NaN or infinite samples")
    return np.ascontiguousarray(x.T), int(rate)


def resampled_length(length: int, rate_in: int, rate_out: int) -> int:
    """round(length · rate_out / rate_in), halves up, in integers."""
    return max(1, (2 * length * rate_out + rate_in) // (2 * rate_in))


def resample(x: np.ndarray, rate_in: int, rate_out: int, block: int = 4096) -> np.ndarray:
    """[C, L] at `rate_in` → [C, resampled_length(L)] float32 at `rate_out` by Kaiser-windowed sinc interpolation
    (module docstring); unchanged when the rates are equal."""
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    n_out, step = resampled_length(x.shape[1], rate_in, rate_out), rate_in / rate_out
    cutoff = 0.5 * min(1.0, rate_out / rate_in) * ROLLOFF  # cycles per input sample
    half = ZERO_CROSSINGS / (2 * cutoff)  # the kernel's half-width, in input samples
    offsets = np.arange(-math.ceil(half), math.ceil(half) + 1)
    src = x.astype(np.float64)
    out = np.empty((x.shape[0], n_out), np.float64)
    for start in range(0, n_out, block):
        pos = np.arange(start, min(start + block, n_out)) * step  # output samples in input-sample units
        idx = np.floor(pos).astype(np.int64)[:, None] + offsets
        d = pos[:, None] - idx
        inside = (np.abs(d) < half) & (idx >= 0) & (idx < x.shape[1])
        window = np.i0(KAISER_BETA * np.sqrt(np.clip(1 - (d / half) ** 2, 0, 1))) / np.i0(KAISER_BETA)
        weight = np.where(inside, 2 * cutoff * np.sinc(2 * cutoff * d) * window, 0.0)
        out[:, start:start + len(pos)] = (src[:, np.clip(idx, 0, x.shape[1] - 1)] * weight).sum(axis=-1)
    return out.astype(np.float32)


def fit_length(x: np.ndarray, length: int) -> np.ndarray:
    """[C, L] → [C, length]: zeros appended at the end, or the end cut off."""
    if x.shape[1] >= length:
        return x[:, :length]
    return np.pad(x, ((0, 0), (0, length - x.shape[1])))


def _to_channels(x: np.ndarray, channels: int, path: Path) -> np.ndarray:
    if x.shape[0] == channels:
        return x
    if channels == 1:
        return x.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    if x.shape[0] == 1:
        return np.repeat(x, channels, axis=0)
    raise DataError(f"{path}: {x.shape[0]} channels cannot become {channels}; ask for 1 (their mean)", key="channels")


def _common(values: dict[Path, int], what: str, key: str) -> int:
    """The value every file shares, or DataError naming two files that differ."""
    seen = {}
    for f, v in values.items():
        seen.setdefault(v, f)
    if len(seen) > 1:
        (a, fa), (b, fb) = list(seen.items())[:2]
        raise DataError(f"{fb}: {what} {b}, but {fa} has {a}; the files must agree, or set {key}", key=key)
    return next(iter(seen))


def _settle(files: list[Path], opts: AudioOptions, skip_bad: bool, log) -> tuple[int, int, int]:
    """(sample rate, length, channels) of the output: the options, or what the readable files share."""
    heads = {}
    for f in files:
        try:
            heads[f] = probe(f)
        except DataError as e:
            if not skip_bad:
                raise DataError(str(e), key="skip_bad") from None
    if not heads:
        raise DataError(f"{files[0].parent}: none of the {len(files)} audio file(s) can be read", key="src")
    rate = opts.sample_rate or _common({f: h[0] for f, h in heads.items()}, "sample rate", "sample_rate")
    channels = opts.channels or _common({f: h[2] for f, h in heads.items()}, "channel count", "channels")
    lengths = [resampled_length(n, r, rate) for r, n, _ in heads.values()]
    length = opts.length or max(lengths)
    if opts.length is None and min(lengths) != length:
        log(f"audio: clips of {min(lengths)} to {length} samples; the shorter ones are padded with silence to "
            f"{length} ({length / rate:.3g} s at {rate} Hz)")
    return rate, length, channels


def prepare_audio(root: Path, out: Path, opts: AudioOptions, *, skip_bad: bool, chunk: int, progress: bool,
                  resume: bool, workers: int, log, text: dict) -> Path:
    """The audio files under `root` → the prepared directory `out` of [C, L] float32 clips (module docstring)."""
    from scm.data.prepare import FileItems, prepare_files
    from scm.data.prepared import check_disk

    opts.check()
    _soundfile()
    files = list_audio(root)
    if not files:
        raise DataError(f"{root}: no audio files found (searched recursively for {', '.join(AUDIO_SUFFIXES)})",
                        key="src")
    rate, length, channels = _settle(files, opts, skip_bad, log)
    check_disk(out, len(files) * (4 * channels * length + 8), f"{len(files)} clip(s) of {channels}×{length} float32")

    def load(f: Path) -> np.ndarray:
        x, own = read_audio(f)
        x = _to_channels(fit_length(resample(x, own, rate), length), channels, f)
        return np.clip(x, -1, 1)

    settings = {"modality": "audio", "sample_rate": rate, "length": length, "channels": channels, "rules": RULES}
    meta = {"sample_rate": rate, "value_range": "raw",
            "preprocessing": {"resample": f"kaiser-sinc(beta={KAISER_BETA}, zeros={ZERO_CROSSINGS}, "
                                          f"rolloff={ROLLOFF})", "length": "pad-or-cut-at-end",
                              "channels": "mean" if channels == 1 else "as-is"}}
    per_chunk = max(1, min(chunk, (64 * 2**20) // (4 * channels * length)))  # ≤ 64 MiB of samples a chunk
    items = FileItems((channels, length), "float32", settings, meta, load)
    return prepare_files(root, files, out, items, skip_bad=skip_bad, chunk=per_chunk, progress=progress,
                         resume=resume, workers=workers, log=log, text=text)
