"""Video → a prepared set of clips [N, C, T, R, R] uint8 (`scm.data.prepared`, modality "video").

Sources (under a folder, recursive; if every source sits in a first-level sub-folder, the sorted sub-folder
names are the classes, as for images):
- video files (MP4, M4V, MOV, MKV, WebM, AVI), decoded with PyAV (FFmpeg, bundled with its wheels: the optional
  extra `video`), the first video stream, frames in presentation order, converted to RGB (or kept grey for a grey
  pixel format) by FFmpeg;
- animated GIF files, decoded with Pillow (each frame composited as the GIF's disposal says; a frame duration of
  0 is taken as 100 ms, as browsers show it);
- folders of frames (asked for with `modality="video"` on a folder of images: a plain image folder looks the
  same): every folder that holds image files is one clip source, its frames ordered by the number in their
  names (natural order: 2 before 10), shown at `fps` (default DEFAULT_FPS).
Each frame goes through the image rules of `scm.data.preprocess` (modes, alpha, channels, ADM's centre crop
with area resize to R×R): the same pixels an image of that frame would give.

Clips (`VideoOptions`): a source of n frames gives the clips starting at frames 0, stride, 2·stride, … that fit
in it, each of `frames` consecutive frames; `frames` defaults to the shortest source's length, at most
DEFAULT_MAX_FRAMES (16, the clip length of common video generation benchmarks), and `stride` to `frames`
(clips that do not overlap). A source shorter than `frames` gives none (counted in meta.json "too_short").
`fps` resamples every source to that rate: output frame k shows the source frame displayed at time k / fps
(the last one whose timestamp is ≤ k / fps: frames are repeated or dropped, never blended), up to the end of the
source's last frame. Without it the frames are kept as they are, and the sources must share their rate (within
1 %), which is recorded as the set's fps.

Written like an image folder (`scm.data.prepare`): one source at a time, its frames decoded as a stream and only
the frames of the clips being cut held in memory, the clips appended `chunk` at a time; resumable after every
chunk (the position is the source and the clip in it; the content of every source begun is checked again on
resuming, by its SHA-256), and atomic. A source that cannot be read is an error naming it; with `skip_bad` it is
skipped and listed in meta.json ("skipped"), keeping the clips it gave before failing, if any.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scm.data import preprocess as pp
from scm.data.images import folder_labels
from scm.data.modality import DEFAULT_FPS
from scm.errors import DataError, require_modules

__all__ = ["DEFAULT_MAX_FRAMES", "VIDEO_SUFFIXES", "VideoOptions", "VideoSource", "frame_plan", "list_sources",
           "prepare_video", "probe"]

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
DEFAULT_MAX_FRAMES = 16
RULES = 1  # the version of these rules (part of the resume key)
CHUNK_BYTES = 256 * 2**20  # at most this many bytes of clips a chunk
GIF_DEFAULT_MS = 100


@dataclass(frozen=True)
class VideoOptions:
    """The clip settings (module docstring): `frames` a clip, `stride` between clip starts, `fps` to resample to."""

    frames: int | None = None
    stride: int | None = None
    fps: float | None = None

    def check(self) -> None:
        for key in ("frames", "stride"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DataError(f"{key}={v!r}: must be a positive integer", key=key)
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not 0 < self.fps < 1e4):
            raise DataError(f"fps={self.fps!r}: must be a positive number of frames per second", key="fps")


@dataclass
class VideoSource:
    """One clip source: a video file ("av"), a GIF ("gif") or a folder of frames ("frames")."""

    path: Path
    kind: str
    times: np.ndarray = field(repr=False)  # each frame's timestamp, seconds from the first
    end: float                             # when the last frame stops showing
    channels: int                          # 1 (grey) or 3
    frames: list[Path] = field(default_factory=list, repr=False)  # a folder's frame files, in order

    @property
    def rate(self) -> float:
        return len(self.times) / self.end if self.end > 0 else DEFAULT_FPS


def _av():
    return require_modules("reading video files", "video", "av")[0]


def _natural(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def list_sources(root: Path, frames: bool) -> list[tuple[Path, str]]:
    """(path, kind) of every clip source under root, sorted: video files and GIFs, or (`frames`) the folders that
    hold image files."""
    if frames:
        folders = sorted({p.parent for p in Path(root).rglob("*") if p.suffix.lower() in pp.SUFFIXES and p.is_file()})
        return [(f, "frames") for f in folders]
    found = []
    for p in sorted(Path(root).rglob("*")):
        suffix = p.suffix.lower()
        if p.is_file() and (suffix in VIDEO_SUFFIXES or suffix == ".gif"):
            found.append((p, "gif" if suffix == ".gif" else "av"))
    return found


def _grey_palette(img) -> bool:
    pal = img.getpalette() or []
    return img.mode == "P" and all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def _probe_gif(path: Path) -> VideoSource:
    img = pp.open_image(path, decode=False)
    try:
        channels = 1 if img.mode == "L" or _grey_palette(img) else pp.image_channels(img)
        durations = []
        for i in range(getattr(img, "n_frames", 1)):
            img.seek(i)
            durations.append((img.info.get("duration") or GIF_DEFAULT_MS) / 1000)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read the GIF ({type(e).__name__}: {e})") from None
    finally:
        img.close()
    times = np.concatenate([[0.0], np.cumsum(durations[:-1])])
    return VideoSource(path, "gif", times, float(sum(durations)), channels)


def _probe_av(path: Path) -> VideoSource:
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            base = stream.time_base
            pts = sorted(float(p.pts * base) for p in container.demux(stream) if p.pts is not None and p.size)
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            fmt = stream.codec_context.format
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read video ({type(e).__name__}: {e})") from None
    if not pts:
        raise DataError(f"{path}: no video frames")
    times = np.asarray(pts) - pts[0]
    step = 1 / rate if rate > 0 else (times[-1] / (len(times) - 1) if len(times) > 1 else 1 / DEFAULT_FPS)
    grey = fmt is not None and fmt.name.startswith(("gray", "ya", "mono"))
    return VideoSource(path, "av", times, float(times[-1] + step), 1 if grey else 3)


def _probe_frames(folder: Path, fps: float | None) -> VideoSource:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in pp.SUFFIXES and p.is_file()), key=_natural)
    with pp.open_image(files[0], decode=False) as img:
        channels = pp.image_channels(img)
    rate = fps or DEFAULT_FPS
    return VideoSource(folder, "frames", np.arange(len(files)) / rate, len(files) / rate, channels, files)


def probe(path: Path, kind: str, fps: float | None = None) -> VideoSource:
    """A clip source's frame times and channels, read without decoding its frames (a GIF's are walked)."""
    if kind == "gif":
        return _probe_gif(path)
    return _probe_av(path) if kind == "av" else _probe_frames(path, fps)


def frame_plan(source: VideoSource, fps: float | None) -> np.ndarray:
    """The source frame each output frame shows (int64 [n_out]): all of them without `fps`, else the frame displayed
    at k / fps for every k / fps before the source's end (module docstring)."""
    if fps is None or source.kind == "frames":
        return np.arange(len(source.times))
    n_out = int(np.floor(source.end * fps + 1e-6))
    at = np.arange(n_out) / fps
    return np.clip(np.searchsorted(source.times, at + 1e-9, side="right") - 1, 0, len(source.times) - 1)


def _raw_frames(source: VideoSource, channels: int, alpha: str) -> Iterator[np.ndarray]:
    """The source's frames in order, each [H, W, C] uint8 (C = 1 or 3, before resizing)."""
    if source.kind == "frames":
        for f in source.frames:
            img = pp.open_image(f)
            try:
                yield pp.to_array(img, channels, alpha, str(f))
            finally:
                img.close()
    elif source.kind == "gif":
        img = pp.open_image(source.path, decode=False)
        try:
            for i in range(len(source.times)):
                img.seek(i)
                img.load()
                yield pp.to_array(img, channels, alpha, str(source.path))
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{source.path}: cannot decode frame {i} ({type(e).__name__}: {e})") from None
        finally:
            img.close()
    else:
        yield from _av_frames(source, channels)


def _av_frames(source: VideoSource, channels: int) -> Iterator[np.ndarray]:
    av = _av()
    fmt = "gray" if source.channels == 1 else "rgb24"
    try:
        with av.open(str(source.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                arr = frame.to_ndarray(format=fmt)
                yield arr[:, :, None] if arr.ndim == 2 else arr
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{source.path}: cannot decode video ({type(e).__name__}: {e})") from None


def clip_starts(n: int, frames: int, stride: int) -> list[int]:
    """The first frames of the clips of `frames` frames, every `stride`, that fit in n frames."""
    return list(range(0, n - frames + 1, stride)) if n >= frames else []


def source_clips(source: VideoSource, plan: np.ndarray, frames: int, stride: int, skip: int, resolution: int,
                 channels: int, alpha: str) -> Iterator[np.ndarray]:
    """The clips [C, frames, R, R] uint8 of a source after its first `skip`, its frames decoded as a stream; only
    the frames of clips not yet complete are held."""
    starts = clip_starts(len(plan), frames, stride)[skip:]
    if not starts:
        return
    last = starts[-1] + frames
    needed = np.zeros(last, bool)
    for s in starts:
        needed[s:s + frames] = True
    held: dict[int, np.ndarray] = {}
    k, decoded = 0, 0
    for i, raw in enumerate(_raw_frames(source, channels, alpha)):
        decoded = i + 1
        done = None
        while k < last and plan[k] == i:
            if needed[k]:
                done = done if done is not None else pp.preprocess_array(raw.transpose(2, 0, 1), resolution,
                                                                          channels, alpha)
                held[k] = done
            k += 1
        while starts and starts[0] + frames <= k:
            s = starts.pop(0)
            yield np.stack([held[j] for j in range(s, s + frames)], axis=1)
            for j in [j for j in held if j < (starts[0] if starts else last)]:
                del held[j]
        if k >= last:
            return
    raise DataError(f"{source.path}: {decoded} frame(s) decoded, but its container lists {len(source.times)}")


def _settle(sources: list[VideoSource], opts: VideoOptions, channels: int | None, root: Path
            ) -> tuple[list[np.ndarray], int, int, float, int]:
    """(frame plans, frames, stride, fps, channels) of the output (module docstring)."""
    plans = [frame_plan(s, opts.fps) for s in sources]
    frames = opts.frames or min(DEFAULT_MAX_FRAMES, min(len(p) for p in plans))
    if opts.fps is not None:
        fps = float(opts.fps)
    else:
        rates = {s.path: s.rate for s in sources if s.kind != "frames"}
        fps = next(iter(rates.values()), DEFAULT_FPS)
        odd = [p for p, r in rates.items() if abs(r - fps) > 0.01 * fps]
        if odd:
            raise DataError(f"{odd[0]}: {rates[odd[0]]:.4g} frames per second, but {sources[0].path} has {fps:.4g}; "
                            "the sources must share a rate, or set fps to resample them", key="fps")
        fps = round(fps, 6)
    if channels is None:
        grey = [s for s in sources if s.channels == 1]
        colour = [s for s in sources if s.channels == 3]
        if grey and colour:
            raise DataError(f"{root}: {len(grey)} greyscale source(s) (e.g. {grey[0].path}) and {len(colour)} colour "
                            f"source(s) (e.g. {colour[0].path}); choose 1 or 3 channels", key="channels")
        channels = 1 if grey else 3
    return plans, frames, opts.stride or frames, fps, channels


def _probe_all(found: list[tuple[Path, str]], fps, skip_bad: bool) -> tuple[list[VideoSource], list[dict]]:
    sources, bad = [], []
    for path, kind in found:
        try:
            sources.append(probe(path, kind, fps))
        except DataError as e:
            if not skip_bad:
                raise DataError(str(e), key="skip_bad") from None
            bad.append({"file": str(path), "reason": str(e)})
    return sources, bad


@dataclass
class _Cut:
    """What `prepare_video` writes: the sources, their plans and the clip settings."""

    sources: list[VideoSource]
    plans: list[np.ndarray]
    frames: int
    stride: int
    resolution: int
    channels: int
    alpha: str

    def clips(self, f: int) -> int:
        return len(clip_starts(len(self.plans[f]), self.frames, self.stride))


def prepare_video(root: Path, out: Path, opts: VideoOptions, *, frames_folders: bool, resolution: int,
                  channels: int | None, alpha: str, skip_bad: bool, chunk: int, progress: bool, resume: bool,
                  log) -> Path:
    """The clip sources under `root` → the prepared directory `out` of [C, T, R, R] uint8 clips (module
    docstring)."""
    from scm.data.prepare import RULES as IMAGE_RULES
    from scm.data.prepare import _digest
    from scm.data.prepared import PreparedWriter

    opts.check()
    found = list_sources(root, frames_folders)
    if not found:
        what = "folders of image frames" if frames_folders else f"video files ({', '.join(VIDEO_SUFFIXES)}, .gif)"
        raise DataError(f"{root}: no {what} found", key="src")
    sources, bad = _probe_all(found, opts.fps, skip_bad)
    if not sources:
        raise DataError(f"{root}: none of the {len(found)} video source(s) can be read", key="src")
    plans, frames, stride, fps, channels = _settle(sources, opts, channels, root)
    cut = _Cut(sources, plans, frames, stride, resolution, channels, alpha)
    rel = [s.path.relative_to(root) for s in sources]
    labels, names = folder_labels(rel)
    counts = [cut.clips(f) for f in range(len(sources))]
    if not sum(counts):
        raise DataError(f"{root}: no source has {frames} frames (the longest has {max(map(len, plans))})",
                        key="frames")
    settings = {"modality": "video", "frames": frames, "stride": stride, "fps": opts.fps, "resolution": resolution,
                "channels": channels, "alpha": alpha, "rules": [IMAGE_RULES, RULES]}
    key = _digest({"files": [r.as_posix() for r in rel], "labelled": labels is not None, **settings})
    clip_bytes = channels * frames * resolution ** 2
    writer = PreparedWriter(out, (channels, frames, resolution, resolution), "uint8", sum(counts),
                            labelled=labels is not None, key=key, resume=resume)
    bad += _write_clips(writer, cut, labels, max(1, min(chunk, CHUNK_BYTES // clip_bytes)), skip_bad, progress)
    if writer.written == 0:
        shutil.rmtree(writer.partial)
        raise DataError(f"{root}: every video source was skipped as unreadable", key="src")
    (writer.partial / "sources-sha256.bin").unlink(missing_ok=True)
    short = sum(c == 0 for c in counts)
    if short:
        log(f"{short} source(s) shorter than {frames} frames gave no clip")
    meta = {"source": str(root.resolve()), "class_names": names, "fps": fps, "frames": frames, "stride": stride,
            "skipped": bad[:100], "skipped_count": len(bad), "too_short": short,
            "preprocessing": {"resize": "adm-center-crop", "alpha": alpha, "resolution": resolution,
                              "channels": channels, "resample": "nearest-previous-frame" if opts.fps else "none",
                              "frames_from": "folders" if frames_folders else "files"}}
    return writer.finish(meta)


def _write_clips(writer, cut: _Cut, labels, chunk: int, skip_bad: bool, progress: bool) -> list[dict]:
    """Append every clip after those already written (`writer.progress` says where), checking the sources already
    begun; return the sources skipped (this run's and an interrupted one's)."""
    from scm.data.prepare import _source_digests

    position = writer.progress.get("next", [0, 0])
    f0, j0 = int(position[0]), int(position[1])
    bad = list(writer.progress.get("skipped", []))
    paths = [s.path for s in cut.sources]
    digests = _source_digests(writer, paths, 1, progress)  # the sources begun: consumed = f + (j > 0)
    buffer: list[tuple[np.ndarray, int]] = []

    def flush(f: int, j: int) -> None:
        if buffer:
            x = np.stack([c for c, _ in buffer])
            y = None if labels is None else np.array([lab for _, lab in buffer], np.int64)
            digests.flush()
            os.fsync(digests.fileno())
            writer.append(x, y, extra={"next": [f, j], "consumed": f + (j > 0), "skipped": bad})
            buffer.clear()

    from scm.data.prepare import DIGEST, _file_digest

    with digests, tqdm(total=len(paths), initial=f0, desc="preparing clips", unit="file", disable=not progress,
                       dynamic_ncols=True) as bar:
        for f in range(f0, len(paths)):
            digests.seek(f * DIGEST)
            digests.write(_file_digest(paths[f]))
            j = j0 if f == f0 else 0
            try:
                for clip in source_clips(cut.sources[f], cut.plans[f], cut.frames, cut.stride, j, cut.resolution,
                                         cut.channels, cut.alpha):
                    buffer.append((clip, -1 if labels is None else int(labels[f])))
                    j += 1
                    if len(buffer) == chunk:
                        flush(f, j)
            except DataError as e:
                if not skip_bad:
                    raise DataError(str(e), key="skip_bad") from None
                bad.append({"file": str(paths[f]), "reason": str(e)})
            bar.update(1)
        flush(len(paths), 0)
    return bad
