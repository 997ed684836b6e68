"""Spoken digits synthesised offline: "zero" … "nine" spoken by espeak-ng in many voices, speeds and pitches.

The usual spoken-digit benchmarks (the Free Spoken Digit Dataset, Speech Commands) cannot be downloaded here, so
this module makes a comparable set from text with the speech synthesiser espeak-ng (the Debian package
`espeak-ng`, a program, not a Python package). Every clip is

- one English digit word, in a voice drawn from `VOICES` × `VARIANTS` (espeak-ng's English accents and its male
  and female voice variants), at a speed drawn from `SPEEDS` (words per minute) and a pitch from `PITCHES`;
  the seed picks these four for every clip, and no two clips of a folder share all four;
- resampled from espeak-ng's 22,050 Hz to 16,000 Hz by a Kaiser-windowed sinc interpolator written with numpy
  (`resample`: 16 zero crossings a side, cut-off at 95 % of the lower Nyquist frequency, ≈ 80 dB stop band);
- trimmed of leading and trailing silence (10 ms frames quieter than 40 dB below the loudest frame), centred in
  exactly one second (padded with zeros; a word longer than a second keeps its middle second);
- peak-normalised to 0.9 of full scale (every clip has the same head-room and 16-bit PCM never clips; the
  loudness of voices still differs a little, as in recorded sets), and written as 16-bit PCM mono WAV.

A folder holds `<digit>/<i>.wav` (class sub-folders, so a folder reader labels them) and `synthesis.json`, which
records the program's version, the ranges and every clip's voice, speed and pitch. espeak-ng is deterministic
(same arguments → same samples, tested), and so is everything here: the same seed gives the same bytes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scm.errors import DataError, InvalidSetting, ScmError
from scm.files import atomic_folder, atomic_write, atomic_write_json
from scm.media import encode_wav

__all__ = ["DIGIT_WORDS", "NAME", "PITCHES", "SAMPLE_RATE", "SPEEDS", "VARIANTS", "VOICES", "ClipSpec",
           "MissingProgram", "fetch_spoken_digits", "plan_clips", "resample", "speak", "spoken_digits_dir",
           "synthesise_spoken_digit_splits", "synthesise_spoken_digits"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16_000  # Hz; one clip is exactly SAMPLE_RATE samples (1 s)
# espeak-ng's English voices (its own "lang/gmw" files, installed with the Debian package; no MBROLA voices)
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# voice variants appended as "+m3": the voice's own default (""), seven male and four female variants
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
SPEEDS = (130, 210)  # words per minute, inclusive (espeak-ng's default is 175)
PITCHES = (25, 75)  # espeak-ng's pitch adjustment 0–99, inclusive (default 50)
PEAK = 0.9  # every clip's largest |sample|, as a fraction of full scale
PROGRAM = "espeak-ng"
NAME = "spoken-digits"  # the built-in data set (`fetch_spoken_digits`, `scm.data.builtin.load_builtin`)


class MissingProgram(ScmError, RuntimeError):
    """A program (not a Python package) that scm runs is not installed; `program` names it."""

    def __init__(self, message: str, *, program: str):
        super().__init__(message, key=program)
        self.program = program


@dataclass(frozen=True)
class ClipSpec:
    """One clip to synthesise: which digit, in which voice (`en-us+f2`), speed (words/min) and pitch (0–99)."""

    digit: int
    voice: str
    speed: int
    pitch: int


def find_program(program: str = PROGRAM) -> str:
    """The path of espeak-ng (or `program`), or MissingProgram saying how to install it."""
    path = shutil.which(program)
    if path is None:
        raise MissingProgram(f"spoken digits are synthesised by the program {program}, which was not found on PATH: "
                             "install the Debian package espeak-ng (apt-get install espeak-ng)", program=program)
    return path


def program_version(program: str = PROGRAM) -> str:
    """espeak-ng's version line ("eSpeak NG text-to-speech: 1.51 …"), recorded with a synthesised set."""
    out = subprocess.run([find_program(program), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().split("  Data at:")[0]


def plan_clips(per_digit: int, seed: int | Sequence[int], exclude: Iterable[ClipSpec] = ()) -> list[ClipSpec]:
    """`per_digit` clips of each digit (digit-major order), each with a voice, variant, speed and pitch drawn
    uniformly by a numpy generator seeded with `seed`. No clip repeats another or one in `exclude` (a test split
    excludes its train split), so every clip is a distinct rendering."""
    if not (isinstance(per_digit, int) and per_digit >= 1):
        raise InvalidSetting("per_digit", per_digit, "must be an int >= 1")
    rng = np.random.default_rng(seed)
    taken = set(exclude)
    specs = []
    for digit in range(len(DIGIT_WORDS)):
        for _ in range(per_digit):
            while True:
                voice, variant = VOICES[rng.integers(len(VOICES))], VARIANTS[rng.integers(len(VARIANTS))]
                spec = ClipSpec(digit, f"{voice}+{variant}" if variant else voice,
                                int(rng.integers(SPEEDS[0], SPEEDS[1] + 1)),
                                int(rng.integers(PITCHES[0], PITCHES[1] + 1)))
                if spec not in taken:
                    break
            taken.add(spec)
            specs.append(spec)
    return specs


def _parse_wav(data: bytes, what: str) -> tuple[int, np.ndarray]:
    """(sample rate, int16 samples) of espeak-ng's mono 16-bit WAV on stdout. Its header's sizes are placeholders
    (a pipe cannot be rewound), so the data chunk is read to the end of the bytes."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DataError(f"{what}: espeak-ng did not write a WAV file")
    offset, rate = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if chunk == b"fmt ":
            channels = int.from_bytes(data[offset + 10:offset + 12], "little")
            rate = int.from_bytes(data[offset + 12:offset + 16], "little")
            bits = int.from_bytes(data[offset + 22:offset + 24], "little")
            if (channels, bits) != (1, 16):
                raise DataError(f"{what}: espeak-ng wrote {channels} channels of {bits} bits, expected mono 16-bit")
        elif chunk == b"data" and rate is not None:
            body = data[offset + 8:]
            return rate, np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2")
        offset += 8 + size + (size & 1)
    raise DataError(f"{what}: espeak-ng's WAV output has no format or data chunk")


def speak(word: str, voice: str, speed: int, pitch: int, program: str = PROGRAM) -> tuple[int, np.ndarray]:
    """espeak-ng's rendering of `word` as (sample rate, int16 samples), exactly as the program writes it."""
    what = f"espeak-ng -v {voice} -s {speed} -p {pitch} {word!r}"
    out = subprocess.run([find_program(program), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=False)
    if out.returncode != 0:
        raise DataError(f"{what} failed (exit {out.returncode}): {out.stderr.decode(errors='replace').strip()}")
    rate, samples = _parse_wav(out.stdout, what)
    if samples.size == 0 or not samples.any():
        raise DataError(f"{what} produced no sound (is the voice {voice!r} installed?)")
    return rate, samples


@functools.lru_cache(maxsize=8)
def _sinc_table(from_rate: int, to_rate: int, zero_crossings: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """`resample`'s filter taps (offsets in input samples) and their weights for each of the to_rate/gcd output
    phases (the output grid meets the input grid again every from_rate/gcd input samples)."""
    step = math.gcd(from_rate, to_rate)
    up, down = to_rate // step, from_rate // step
    cutoff = 0.95 * min(1.0, to_rate / from_rate)  # in units of the input's Nyquist frequency
    reach = zero_crossings / cutoff  # the filter's half-length, in input samples
    taps = np.arange(-math.ceil(reach) + 1, math.ceil(reach) + 1)
    distance = (np.arange(up) * down % up / up)[:, None] - taps[None, :]  # τ − m for each phase and tap
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (distance / reach) ** 2, 0.0, None))) / np.i0(beta)
    return taps, cutoff * np.sinc(cutoff * distance) * np.where(np.abs(distance) < reach, window, 0.0)


def resample(x: np.ndarray, from_rate: int, to_rate: int, zero_crossings: int = 16, beta: float = 8.0) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by Kaiser-windowed sinc interpolation (float64 → float64).

    Output sample n sits at input time τ = n·from_rate/to_rate and is Σ_m x[m]·h(τ − m), with h a low-pass at 95 %
    of the lower Nyquist frequency (so resampling down does not alias) windowed to `zero_crossings` of its sinc on
    each side by a Kaiser window of shape `beta` (8 ≈ 80 dB stop band); the weights repeat with the output's phase
    against the input grid, so they are computed once per pair of rates (a polyphase filter). Samples outside x
    count as zeros. The output has ceil(len(x)·to_rate/from_rate) samples."""
    x = np.asarray(x, dtype=np.float64)
    taps, table = _sinc_table(from_rate, to_rate, zero_crossings, beta)
    step = math.gcd(from_rate, to_rate)
    up, down = to_rate // step, from_rate // step
    n = np.arange(-(-len(x) * up // down))
    index = (n * down // up)[:, None] + taps[None, :]
    padded = np.concatenate([np.zeros(len(taps)), x, np.zeros(len(taps))])
    return (padded[index + len(taps)] * table[n % up]).sum(axis=1)


def fit_to_second(x: np.ndarray, rate: int = SAMPLE_RATE, floor_db: float = -40.0) -> np.ndarray:
    """Trim silence (10 ms frames whose RMS is `floor_db` or more below the loudest frame's) from both ends,
    centre what is left in exactly `rate` samples (zeros either side; a longer word keeps its middle second) and
    peak-normalise it to PEAK."""
    frame = rate // 100
    n_frames = -(-len(x) // frame)
    frames = np.concatenate([x, np.zeros(n_frames * frame - len(x))]).reshape(n_frames, frame)
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = np.flatnonzero(rms > rms.max() * 10 ** (floor_db / 20))
    word = x[loud[0] * frame: min(len(x), (loud[-1] + 1) * frame)]
    if len(word) > rate:
        start = (len(word) - rate) // 2
        word = word[start:start + rate]
    out = np.zeros(rate)
    start = (rate - len(word)) // 2
    out[start:start + len(word)] = word
    return out * (PEAK / np.abs(out).max())


def render_clip(spec: ClipSpec, program: str = PROGRAM) -> np.ndarray:
    """One clip as float64 [SAMPLE_RATE] in [-PEAK, PEAK]: spoken, resampled to 16 kHz, trimmed, centred, normalised."""
    rate, samples = speak(DIGIT_WORDS[spec.digit], spec.voice, spec.speed, spec.pitch, program)
    return fit_to_second(resample(samples / 32768.0, rate, SAMPLE_RATE))


def _write_clips(folder: Path, specs: list[ClipSpec], seed, workers: int, program: str) -> None:
    """Render `specs` (in parallel subprocesses; numpy releases the GIL for the rest) into `folder`, which is being
    built (atomic_folder publishes it), and record them in synthesis.json."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        clips = list(pool.map(lambda spec: render_clip(spec, program), specs))
    counters: dict[int, int] = {}
    records = []
    for spec, clip in zip(specs, clips, strict=True):
        index = counters[spec.digit] = counters.get(spec.digit, -1) + 1
        name = f"{spec.digit}/{index}.wav"
        atomic_write(folder / name, encode_wav(clip[None], SAMPLE_RATE))
        records.append({"file": name, **asdict(spec)})
    manifest = {"program": program_version(program), "seed": seed, "sample_rate": SAMPLE_RATE, "seconds": 1,
                "normalisation": f"peak {PEAK}", "voices": VOICES, "variants": VARIANTS, "speeds": SPEEDS,
                "pitches": PITCHES, "words": DIGIT_WORDS, "clips": records}
    atomic_write_json(folder / "synthesis.json", manifest)


def _check_free(path: str | Path, replace: bool) -> None:
    """Fail before minutes of synthesis, not after, when `path` is taken (an empty folder is not)."""
    path = Path(path)
    if not replace and (path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))):
        raise FileExistsError(f"{path}: already exists")


def _workers(workers: int | None) -> int:
    return workers if workers is not None else min(8, 2 * (os.cpu_count() or 1))


def synthesise_spoken_digits(out: str | Path, per_digit: int = 300, seed: int = 0, *, workers: int | None = None,
                             replace: bool = False, program: str = PROGRAM) -> Path:
    """Synthesise `per_digit` clips of each digit into the folder `out` (`<digit>/<i>.wav` and synthesis.json, as
    the module docstring describes), atomically: `out` appears complete or not at all. An existing `out` is an
    error unless `replace`. `workers` espeak-ng processes run at once (default twice the CPU count, at most 8).
    Raises MissingProgram when espeak-ng is not installed."""
    find_program(program)
    _check_free(out, replace)
    specs = plan_clips(per_digit, seed)
    with atomic_folder(out, replace=replace) as tmp:
        _write_clips(tmp, specs, seed, _workers(workers), program)
    return Path(out)


def synthesise_spoken_digit_splits(root: str | Path, train_per_digit: int = 300, test_per_digit: int = 50,
                                   seed: int = 0, *, workers: int | None = None, replace: bool = False,
                                   program: str = PROGRAM) -> Path:
    """A train and a test split in `root/train` and `root/test` (each a folder as `synthesise_spoken_digits` writes),
    drawn from the same voices and ranges with the seeds (seed, 0) and (seed, 1); no test clip repeats a train
    clip's digit, voice, speed and pitch. `root` is written atomically as a whole."""
    find_program(program)
    _check_free(root, replace)
    train = plan_clips(train_per_digit, [seed, 0])
    test = plan_clips(test_per_digit, [seed, 1], exclude=train)
    with atomic_folder(root, replace=replace) as tmp:
        for name, specs, split_seed in (("train", train, [seed, 0]), ("test", test, [seed, 1])):
            (tmp / name).mkdir()
            _write_clips(tmp / name, specs, split_seed, _workers(workers), program)
    return Path(root)


def spoken_digits_dir(split: str, root: Path | None = None) -> Path:
    """Where the built-in set's prepared split is kept: <data dir>/spoken-digits/<split>/ (its WAV files beside it,
    in <data dir>/spoken-digits/wav/<split>/)."""
    from scm.data.builtin import data_dir

    return (data_dir() if root is None else Path(root)) / NAME / split


def fetch_spoken_digits(root: Path | None = None, *, train_per_digit: int = 300, test_per_digit: int = 50,
                        seed: int = 0, log=print) -> dict[str, Path]:
    """The built-in audio set: synthesise the train and test splits (`synthesise_spoken_digit_splits`) as WAV files
    under <root>/spoken-digits/wav/ and prepare each (`scm.data.prepare`: [1, 16000] float32 clips labelled by the
    digit) into <root>/spoken-digits/{train,test}/ (root: the data directory); returns the two prepared paths. What
    is already there with the same counts and seed is kept; other counts or seed are an error (remove it first)."""
    from scm.data.prepare import prepare
    from scm.data.prepared import is_prepared, load_prepared

    wav = spoken_digits_dir("wav", root)
    counts = {"train": train_per_digit, "test": test_per_digit}
    if wav.exists():
        made = json.loads((wav / "train" / "synthesis.json").read_text()) if (wav / "train").is_dir() else {}
        if made.get("seed") != [seed, 0] or len(made.get("clips", ())) != 10 * train_per_digit:
            raise DataError(f"{wav}: synthesised with other settings than seed {seed} and {train_per_digit} clips "
                            "per digit; remove it to synthesise again", key="out")
    else:
        log(f"{NAME}: synthesising {10 * train_per_digit} + {10 * test_per_digit} clips with {PROGRAM} into {wav}")
        synthesise_spoken_digit_splits(wav, train_per_digit, test_per_digit, seed)
    paths = {}
    for split in ("train", "test"):
        out = spoken_digits_dir(split, root)
        if is_prepared(out) and len(load_prepared(out, in_memory=False)) == 10 * counts[split]:
            log(f"{NAME} {split}: already prepared at {out}")
        else:
            prepare(str(wav / split), out, progress=False, log=log)
        paths[split] = out
    return paths
