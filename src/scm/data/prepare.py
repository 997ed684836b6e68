"""Convert a data set into a prepared directory (`scm.data.prepared`): memory-mapped 8-bit images for training
and evaluation with memory that does not grow with the data set.

Sources:
- a folder of images (recursive: PNG, JPEG, WebP, BMP, GIF (first frame), TIFF; the sorted file list; if every
  image sits in a first-level sub-folder, the sorted sub-folder names are the classes, as `load_folder` reads
  them). Files are decoded a chunk at a time (in a few threads), so a folder of any size fits;
- anything else `scm.data.load_dataset` opens ("mnist", "mnist:test", an .npz, an IDX or CIFAR-10 folder, a
  prepared directory): held in memory as it loads, written a chunk at a time.

Captions are kept: a folder's (sidecar .txt files or a metadata.jsonl: `scm.data.caption_files`, read before any
image) or a data set's (`captions`, e.g. "mnist-captions") are stored in captions.jsonl, those of skipped images
left out; with a text encoder (`text_encoder`, what `scm data encode --text-encoder` without a VAE does) each
caption's prompt embedding is stored too (`scm.data.prompts`). They are part of what a continued run must share.

Each image goes through `scm.data.preprocess` (modes, alpha, channels, and ADM/EDM2's centre crop with area
resize to R×R); 8-bit arrays already at R×R with the asked channels are written as they are. Arrays of floats
(e.g. latents) are written as float32 model-space values (`value_range` "raw") and are never resized.

Resumable: after every chunk the writer records how many source files were consumed (and which were skipped),
so an interrupted run continues with the next file and gives the same bytes as an uninterrupted one, as long as
what it continues is what it would prepare now. That is decided by
- the writer's key: a hash of the settings and of the sorted relative file list (the names give the count, the
  order and the labels), or of an in-memory source's arrays; another key is "something else", never continued;
- the content of every source file already consumed: its SHA-256 is computed as it is read for preparation
  (one more read of a file that is in the page cache anyway) and stored in DIR.partial/sources-sha256.bin before the
  chunk is recorded; a continued run reads those files again (no decoding) and refuses, naming the file, when
  one has changed. Sizes and modification times are not the rule: equal sizes and times can hide other pixels
  (a rewrite that keeps them, `cp -p`, `rsync -t`), and a mere `touch` or copy changes nothing that was
  prepared; only the content decides. Files not yet consumed may change freely: they are read when their
  turn comes. (A file rewritten during the moment between its hashing and its decoding is not detected.)
Nothing appears under the output's name until the data set is complete.

Sizes are bounded before any work starts: `resolution` is at most MAX_RESOLUTION pixels a side; the memory of
a chunk (2·chunk·C·R² bytes: its images decoded, then stacked) and of the images being decoded (about
WORKING_BYTES·R² a thread) must fit in MEMORY_SHARE of the available memory, or the chunk (then the number of
threads) is made smaller, and when one image in one thread does not fit it is an error naming the numbers; the
output (N·C·R² bytes, and 8 a label) must fit in the free space of its file system (`check_disk`). (The decoded
size of a source image is its own: Pillow refuses images over 2·Image.MAX_IMAGE_PIXELS pixels.)

An undecodable file is an error naming it; with `skip_bad` it is skipped, and the skipped files (the first
100, with the reasons) and their count are recorded in meta.json ("skipped", "skipped_count").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scm._checks import describe_shape
from scm.data import preprocess as pp
from scm.data.caption_files import folder_captions
from scm.data.images import folder_labels
from scm.data.prepared import PreparedWriter, allocated, check_disk, describe_bytes, is_prepared
from scm.data.prompts import CaptionSpec, caption_stats
from scm.devices import available_memory
from scm.errors import DataError
from scm.files import sha256_of

__all__ = ["MAX_RESOLUTION", "list_images", "prepare"]

SKIPPED_LISTED = 100
RULES = 2  # the version of the preprocessing rules and of the resume key (2: 16-bit colour, source digests)
MAX_RESOLUTION = 8192  # pixels a side (one 8192×8192 colour image is 201 MB)
WORKING_BYTES = 16  # memory per output pixel of an image being decoded: RGBA images (resized, cropped), arrays
MEMORY_SHARE = 0.5  # the share of the available memory a preparation plans to use
DIGESTS = "sources-sha256.bin"  # in DIR.partial/: the SHA-256 of each source file consumed (32 bytes each)
DIGEST = 32


def list_images(root: Path) -> list[Path]:
    """Every image file under root (recursive), sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in pp.SUFFIXES and p.is_file())


def _is_image_folder(src: str) -> bool:
    """A plain folder of images, as opposed to the folders `load_dataset` reads otherwise (prepared, CIFAR, IDX)."""
    p = Path(src).expanduser()
    if not p.is_dir() or is_prepared(p):
        return False
    if (p / "data_batch_1").is_file() or (p / "test_batch").is_file():
        return False
    return not any(p.glob("train-images*idx3-ubyte*"))


def _check(resolution, channels, alpha, chunk) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise DataError(f"resolution={resolution!r}: must be a positive integer (pixels)", key="resolution")
    if resolution > MAX_RESOLUTION:
        raise DataError(f"resolution={resolution}: at most {MAX_RESOLUTION} pixels a side (one {resolution}×"
                        f"{resolution} colour image alone would be {describe_bytes(3 * resolution ** 2)})",
                        key="resolution")
    if channels not in (None, 1, 3):
        raise DataError(f"channels={channels!r}: must be 1 (greyscale) or 3 (colour)", key="channels")
    if alpha not in pp.ALPHA:
        raise DataError(f"alpha={alpha!r}: must be one of {', '.join(pp.ALPHA)}", key="alpha")
    if not isinstance(chunk, int) or chunk < 1:
        raise DataError(f"chunk={chunk!r}: must be a positive integer", key="chunk")


def _plan(resolution: int, channels: int, chunk: int, workers: int, log) -> tuple[int, int]:
    """(chunk, threads) whose estimated memory, 2·chunk·C·R² + threads·WORKING_BYTES·R² bytes, fits MEMORY_SHARE of
    the available memory: as many threads as fit (at most `workers`, at most the chunk), then the largest chunk (at
    most `chunk`); DataError naming the numbers when one image in one thread does not fit."""
    pixels = resolution * resolution

    def need(k: int, n: int) -> int:
        return 2 * k * channels * pixels + n * WORKING_BYTES * pixels

    available = available_memory()
    if available is None or need(chunk, workers) <= MEMORY_SHARE * available:
        return chunk, workers
    budget = int(MEMORY_SHARE * available)
    if need(1, 1) > budget:
        raise DataError(f"resolution={resolution}: preparing {channels}-channel {resolution}×{resolution} images needs "
                        f"about {describe_bytes(need(1, 1))} of memory even one at a time, but "
                        f"{describe_bytes(available)} is available (at most {MEMORY_SHARE:.0%} of it is used)",
                        key="resolution")
    n = max(1, min(workers, chunk, budget // ((2 * channels + WORKING_BYTES) * pixels)))
    k = min(chunk, (budget - n * WORKING_BYTES * pixels) // (2 * channels * pixels))
    log(f"memory: {resolution}×{resolution} images are prepared {k} at a time in {n} thread(s) (about "
        f"{describe_bytes(need(k, n))}; {describe_bytes(available)} available)")
    return k, n


def _file_digest(path: Path) -> bytes:
    """The SHA-256 of a file's bytes (of a folder of video frames: of its image files' names and digests, in name
    order); 32 zero bytes when it cannot be read (its decoding reports that, or skips it)."""
    try:
        if Path(path).is_dir():
            h = hashlib.sha256()
            for f in sorted(p for p in Path(path).iterdir() if p.suffix.lower() in pp.SUFFIXES and p.is_file()):
                h.update(f.name.encode() + b"\0" + sha256_of(f).digest())
            return h.digest()
        return sha256_of(path).digest()
    except OSError:
        return bytes(DIGEST)


def _source_digests(writer: PreparedWriter, files: list[Path], workers: int, progress: bool):
    """The file of the source files' digests in DIR.partial/ (open, to write them as files are consumed). A
    continued run first reads the files it consumed again and refuses, naming one, when their content changed."""
    path, done = writer.partial / DIGESTS, int(writer.progress.get("consumed", 0))
    if done and (not path.is_file() or path.stat().st_size != DIGEST * len(files)):
        raise DataError(f"{writer.partial}: an interrupted preparation without the digests of its sources "
                        f"({DIGESTS}); remove it to prepare again from the start", key="out")
    with open(path, "ab") as f:
        f.truncate(DIGEST * len(files))
    digests = np.fromfile(path, dtype=np.uint8, count=DIGEST * done).reshape(done, DIGEST)
    changed = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=done, desc="checking the sources already prepared",
                                                   unit="file", disable=not progress or not done, leave=False) as bar:
        for i in range(0, done, 1024):
            now = pool.map(_file_digest, files[i: min(i + 1024, done)])
            changed += [j for j, d in enumerate(now, start=i) if d != digests[j].tobytes()]
            bar.update(min(1024, done - i))
    if changed:
        raise DataError(f"{files[changed[0]]}: changed since an interrupted run prepared it into {writer.partial} "
                        f"({len(changed)} of the {done} file(s) it prepared have other content now); remove "
                        f"{writer.partial} to prepare again from the start", key="src")
    return open(path, "r+b")


def _digest(obj, *buffers) -> str:
    h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
    for b in buffers:
        h.update(memoryview(b).cast("B"))
    return h.hexdigest()


def _preprocessing(resize: str, alpha: str, resolution: int, channels: int) -> dict:
    return {"resize": resize, "alpha": alpha, "resolution": resolution, "channels": channels,
            "sixteen_bit": pp.SIXTEEN_BIT}


def _common_channels(files: list[Path], root: Path, progress: bool) -> int:
    """1 or 3: the channels every (readable) image has; mixed greyscale and colour is an error."""
    seen: dict[int, list] = {1: [0, None], 3: [0, None]}
    for f in tqdm(files, desc="reading image modes", unit="img", disable=not progress, leave=False):
        try:
            with pp.open_image(f, decode=False) as img:
                c = pp.image_channels(img)
        except DataError:
            continue  # the decoding pass reports it (or skips it)
        seen[c][0] += 1
        seen[c][1] = seen[c][1] or f
    (g, g_ex), (c, c_ex) = seen[1], seen[3]
    if g and c:
        raise DataError(f"{root}: {g} greyscale image(s) (e.g. {g_ex}) and {c} colour image(s) (e.g. {c_ex}); "
                        "choose 1 or 3 channels", key="channels")
    return 1 if g else 3


def _captions(captions, text: dict, source) -> tuple[CaptionSpec | None, str | None]:
    """The writer's caption plan for a source's captions (None: it has none) and their digest, for the key."""
    if captions is None:
        if text.get("encoder") is not None:
            raise DataError(f"{source}: no captions to encode (a folder needs caption files or a metadata.jsonl)",
                            key="data")
        return None, None
    rows, nbytes, digest = caption_stats(captions)
    return CaptionSpec(rows, nbytes, **text), digest


def _write(writer: PreparedWriter, chunks, total: int, progress: bool, desc: str) -> tuple[list, int]:
    """Append the chunks (images, labels, consumed, newly skipped, captions or None) after those already written;
    return the skipped files and their count, including those of an interrupted run."""
    done = writer.progress.get("consumed", 0)
    skipped, count = list(writer.progress.get("skipped", [])), int(writer.progress.get("skipped_count", 0))
    with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images, labels, consumed, bad, captions in chunks(done):
            count += len(bad)
            skipped += bad[: max(0, SKIPPED_LISTED - len(skipped))]
            writer.append(images, labels, extra={"consumed": consumed, "skipped": skipped, "skipped_count": count},
                          captions=captions)
            bar.update(consumed - bar.n)
    return skipped, count


def _prepare_folder(root: Path, out: Path, resolution: int, channels: int | None, alpha: str, skip_bad: bool,
                    chunk: int, progress: bool, resume: bool, workers: int, log, text: dict) -> Path:
    files = list_images(root)
    if not files:
        raise DataError(f"{root}: no images found (searched recursively for {', '.join(pp.SUFFIXES)})", key="src")
    labelled = folder_labels([f.relative_to(root) for f in files])[0] is not None
    fewest = channels or 1  # before reading any image (the writer checks the exact size)
    need = len(files) * (fewest * resolution ** 2 + 8 * labelled)
    check_disk(out, need - allocated(out.with_name(out.name + ".partial")),
               f"{len(files)} image(s) of {fewest}×{resolution}×{resolution}")
    if channels is None:
        channels = _common_channels(files, root, progress)
    settings = {"resolution": resolution, "channels": channels, "alpha": alpha, "rules": RULES}
    meta = {"preprocessing": _preprocessing("adm-center-crop", alpha, resolution, channels)}
    return prepare_files(root, files, out, FileItems((channels, resolution, resolution), "uint8", settings, meta,
                                                     lambda f: pp.preprocess_image(f, resolution, channels, alpha)),
                         skip_bad=skip_bad, chunk=chunk, progress=progress, resume=resume, workers=workers, log=log,
                         text=text)


@dataclass
class FileItems:
    """How each source file becomes one item of a prepared set (`prepare_files`): the item `shape` and `dtype`,
    the `settings` that decide its bytes (part of the resume key), `meta` for meta.json, and `load`: a file → an
    array of `shape` (DataError naming the file when it cannot)."""

    shape: tuple[int, ...]
    dtype: str
    settings: dict
    meta: dict
    load: Callable[[Path], np.ndarray]


def prepare_files(root: Path, files: list[Path], out: Path, items: FileItems, *, skip_bad: bool, chunk: int,
                  progress: bool, resume: bool, workers: int, log, text: dict) -> Path:
    """Write one item per source file (images, audio clips) into the prepared directory `out`, `chunk` files at a
    time in `workers` threads, resumable (module docstring): labels from class sub-folders, captions from caption
    files, undecodable files an error or skipped (`skip_bad`)."""
    captions = folder_captions(root, files)
    spec, digest = _captions(captions, text, root)
    rel = [f.relative_to(root) for f in files]
    labels, names = folder_labels(rel)
    key = _digest({"files": [r.as_posix() for r in rel], "labelled": labels is not None, **items.settings,
                   **({"captions": digest} if digest else {})})
    writer = PreparedWriter(out, items.shape, items.dtype, len(files), labelled=labels is not None,
                            key=key, resume=resume, captions=spec)
    digests = _source_digests(writer, files, workers, progress)

    def one(f: Path):
        digest = _file_digest(f)  # the file is read again by the decoder, from the page cache
        try:
            return digest, items.load(f)
        except DataError as e:
            if not skip_bad:
                raise DataError(str(e), key="skip_bad") from None  # the setting that would skip it
            return digest, e

    def chunks(start: int):
        with ThreadPoolExecutor(workers) as pool:
            for i in range(start, len(files), chunk):
                done = list(pool.map(one, files[i: i + chunk]))  # in order: the first bad file raises
                digests.seek(i * DIGEST)
                digests.write(b"".join(d for d, _ in done))
                digests.flush()
                os.fsync(digests.fileno())  # on disk before the writer records the chunk as consumed
                results = [r for _, r in done]
                keep = [j for j, r in enumerate(results) if not isinstance(r, DataError)]
                bad = [{"file": rel[i + j].as_posix(), "reason": str(r)} for j, r in enumerate(results)
                       if isinstance(r, DataError)]
                images = (np.stack([results[j] for j in keep]) if keep
                          else np.empty((0, *items.shape), items.dtype))
                caps = None if captions is None else [captions[i + j] for j in keep]
                yield images, None if labels is None else labels[i: i + chunk][keep], i + len(results), bad, caps

    with digests:
        skipped, count = _write(writer, chunks, len(files), progress, f"preparing {root.name}")
    if writer.written == 0:
        shutil.rmtree(writer.partial)  # nothing to continue
        raise DataError(f"{root}: every one of the {len(files)} file(s) was skipped as undecodable", key="src")
    (writer.partial / DIGESTS).unlink()
    meta = {"source": str(root.resolve()), "class_names": names, "skipped": skipped, "skipped_count": count,
            **items.meta}
    path = writer.finish(meta)
    if count:
        log(f"skipped {count} undecodable file(s) (listed in {path / 'meta.json'}), e.g. {skipped[0]['reason']}")
    return path


def _source_key(data) -> str:
    """What identifies an in-memory source: its arrays' bytes (a prepared one: its metadata and file stats)."""
    if isinstance(data.images, torch.Tensor):
        labels = [] if data.labels is None else [data.labels.contiguous().numpy()]
        return _digest({"source": data.source}, data.images.contiguous().numpy(), *labels)
    stat = (Path(data.path) / "images.bin").stat()
    return _digest({"meta": data.meta, "size": stat.st_size, "mtime": stat.st_mtime_ns, "n": len(data)})


def _prepare_dataset(data, out: Path, resolution: int, channels: int | None, alpha: str, chunk: int,
                     progress: bool, resume: bool, workers: int, text: dict) -> Path:
    n, src_c = len(data), data.channels
    floats = data.value_range != "uint8"
    if floats:
        own, square = data.shape[1:], data.shape[1:] == (resolution, resolution)
        if not square or channels not in (None, src_c):
            how = (f"ask for its own {own[0]}×{own[1]} with {src_c} channel(s)" if own[0] == own[1] else
                   f"train on its {describe_shape(data.shape)} items as they are (prepared sets are square)")
            raise DataError(f"{data.source}: holds {data.value_range} float values; only 8-bit images are resized "
                            f"or converted, so {how}", key="channels" if square else "resolution")
        channels = src_c
    elif src_c not in (1, 2, 3, 4):
        raise DataError(f"{data.source}: {src_c} channels; 8-bit images need 1 to 4 (L, LA, RGB, RGBA)")
    channels = channels or {1: 1, 2: 1, 3: 3, 4: 3}[src_c]
    as_is = floats or (data.shape == (channels, resolution, resolution))
    dtype = (str(data.images.dtype) if isinstance(data.images, np.ndarray) and data.images.dtype == np.float16
             else "float32") if floats else "uint8"
    settings = {"resolution": resolution, "channels": channels, "alpha": alpha, "rules": RULES, "dtype": dtype}
    labelled = data.labels is not None
    spec, digest = _captions(data.captions, text, data.source)
    key = _digest({"data": _source_key(data), **settings, **({"captions": digest} if digest else {})})
    writer = PreparedWriter(out, (channels, resolution, resolution), dtype, n, labelled=labelled, key=key,
                            resume=resume, captions=spec)

    def rows(i: int) -> np.ndarray:
        x = data.images[i: i + chunk]
        if floats:
            return data.to_model(torch.as_tensor(np.asarray(x))).numpy().astype(dtype)
        return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    def chunks(start: int):
        with ThreadPoolExecutor(workers) as pool:
            for i in range(start, n, chunk):
                x = rows(i)
                if not as_is:
                    x = np.stack(list(pool.map(lambda a: pp.preprocess_array(a, resolution, channels, alpha), x)))
                y = None if not labelled else data.labels[i: i + chunk].numpy()
                yield x, y, i + len(x), [], None if spec is None else list(data.captions[i: i + chunk])

    _write(writer, chunks, n, progress, "preparing")
    meta = {"source": data.source, "class_names": data.class_names, "skipped": [], "skipped_count": 0,
            "value_range": "raw" if floats else "uint8",
            "preprocessing": _preprocessing("none" if as_is else "adm-center-crop", alpha, resolution, channels)}
    if getattr(data, "latent", None):
        meta["latent"] = data.latent
    return writer.finish(meta)


def prepare(src, out: str | Path, *, resolution: int | None = None, channels: int | None = None,
            alpha: str = "white", skip_bad: bool = False, chunk: int = 256, progress: bool = True,
            resume: bool = True, workers: int | None = None, log=print, text_encoder=None,
            text_dtype: str = "float16", text_batch: int = 256, modality: str | None = None,
            frames: int | None = None, stride: int | None = None, fps: float | None = None,
            sample_rate: int | None = None, length: int | None = None) -> Path:
    """Write `src` (an image folder, anything `load_dataset` opens, or a data set it returned) as a prepared
    directory `out` of [channels, resolution, resolution] uint8 images (labels and captions when the source has
    them); return `out`. With `text_encoder` (a `scm.text.TextEncoder`) the captions' prompt embeddings are stored
    too, as `text_dtype`, `text_batch` captions per encoder call.

    A folder of video files or animated GIFs becomes [channels, frames, R, R] uint8 clips (`scm.data.video`:
    `frames`, `stride`, `fps`), a folder of audio files [channels, length] float32 clips (`scm.data.audio`:
    `sample_rate`, `length`; no resolution); the folder's files decide which (`source_modality`), or
    `modality` ("image", "video", "audio") says it: "video" on a folder of images reads each sub-folder of
    frames as one clip.

    `channels` None keeps the source's (1 or 3; a folder's images must then agree); `alpha` "white" or "drop"
    (images with transparency); `skip_bad` skips undecodable files (recorded in meta.json) instead of failing;
    `resume` continues an interrupted run (otherwise its partial output is discarded; one whose prepared source
    files have changed is refused); `workers` decoding threads (default: the CPU count, at most 8). Sizes are
    checked before any work (module docstring): a resolution over MAX_RESOLUTION, or an output larger than the
    memory or the disk allows, is a DataError naming the setting and the numbers."""
    out, workers = Path(out), workers or min(8, os.cpu_count() or 1)
    folder = isinstance(src, (str, Path)) and _is_image_folder(str(src))
    kind = source_modality(Path(src).expanduser(), modality) if folder else modality
    data = None
    if not folder:
        from scm.data import load_dataset

        data = load_dataset(src) if isinstance(src, (str, Path)) else src
        kind = kind or data.modality
    options = {"frames": frames, "stride": stride, "fps": fps, "sample_rate": sample_rate, "length": length}
    _check_modality(kind, resolution, options, folder and modality is None)
    if kind != "audio":
        _check(resolution, channels, alpha, chunk)
    if out.exists():  # before reading any source (the writer checks it too)
        raise DataError(f"{out} already exists; choose another output directory or remove it", key="out")
    text = {} if text_encoder is None else {"encoder": text_encoder, "dtype": text_dtype, "batch": text_batch}
    common = {"skip_bad": skip_bad, "chunk": chunk, "progress": progress, "resume": resume, "log": log}
    if kind in ("video", "audio"):
        return _prepare_media(src if folder else data, out, kind, options, resolution, channels, alpha, workers,
                              text, common)
    chunk, workers = _plan(resolution, channels or 3, chunk, workers, log)
    if folder:
        return _prepare_folder(Path(src).expanduser(), out, resolution, channels, alpha, skip_bad, chunk, progress,
                               resume, workers, log, text)
    return _prepare_dataset(data, out, resolution, channels, alpha, chunk, progress, resume, workers, text)


def _prepare_media(src, out: Path, kind: str, options: dict, resolution, channels, alpha, workers, text,
                   common: dict) -> Path:
    """A video or audio folder (or data set) → a prepared set (`scm.data.video`, `scm.data.audio`)."""
    if not isinstance(src, (str, Path)):
        raise DataError(f"{src.source}: a {kind} data set is prepared from its files (a folder of {kind} files), "
                        "or used as it is", key="src")
    root = Path(src).expanduser()
    if kind == "audio":
        from scm.data.audio import AudioOptions, prepare_audio

        if channels not in (None, 1, 2):
            raise DataError(f"channels={channels!r}: audio takes 1 (mono) or 2 (stereo)", key="channels")
        opts = AudioOptions(options["sample_rate"], options["length"], channels)
        return prepare_audio(root, out, opts, workers=workers, text=text, **common)
    from scm.data.video import VideoOptions, list_sources, prepare_video

    if text:
        raise DataError(f"{root}: captions of video clips are not prepared (prompt embeddings are for images)",
                        key="src")
    frames_folders = not list_sources(root, frames=False) or all(k == "gif" and not _animated(p)
                                                                 for p, k in list_sources(root, frames=False))
    opts = VideoOptions(options["frames"], options["stride"], options["fps"])
    return prepare_video(root, out, opts, frames_folders=frames_folders, resolution=resolution, channels=channels,
                         alpha=alpha, **common)


MODALITY_OPTIONS = {"image": (), "video": ("frames", "stride", "fps"), "audio": ("sample_rate", "length")}


def _check_modality(kind: str, resolution, options: dict, detected: bool) -> None:
    """The settings fit the modality: a resolution for images and video, none for audio; video's and audio's own
    settings only for them."""
    if kind not in MODALITY_OPTIONS:
        raise DataError(f"modality={kind!r}: must be one of {', '.join(MODALITY_OPTIONS)}", key="modality")
    how = " (found by its files)" if detected else ""
    wrong = [k for k, v in options.items() if v is not None and k not in MODALITY_OPTIONS[kind]]
    if wrong:
        raise DataError(f"{wrong[0]}: a setting of {'video' if wrong[0] in MODALITY_OPTIONS['video'] else 'audio'}, "
                        f"but the source is {kind}{how}", key=wrong[0])
    if kind == "audio" and resolution is not None:
        raise DataError(f"resolution={resolution}: audio has none (its settings are sample_rate and length); the "
                        f"source is audio{how}", key="resolution")
    if kind != "audio" and resolution is None:
        what = "frames" if kind == "video" else "images"
        raise DataError(f"{kind} needs a resolution (the side R of the R×R {what})", key="resolution")


def _animated(path: Path) -> bool:
    try:
        with pp.open_image(path, decode=False) as img:
            return bool(getattr(img, "is_animated", False))
    except DataError:
        return True  # unreadable: its preparation names it


def source_modality(root: Path, modality: str | None = None) -> str:
    """What a folder holds, by its files: "audio" (WAV, FLAC, Ogg), "video" (video files, or only GIFs of which one
    is animated) or "image" (image files: GIFs among other images are images, their first frame); a folder
    mixing two of them is a DataError naming an example of each. `modality` given: checked against what is there
    ("video" on image files: folders of frames)."""
    from scm.data.audio import AUDIO_SUFFIXES
    from scm.data.video import VIDEO_SUFFIXES

    seen: dict[str, list[Path]] = {"image": [], "gif": [], "video": [], "audio": []}
    for p in sorted(Path(root).rglob("*")):
        suffix = p.suffix.lower()
        kind = ("gif" if suffix == ".gif" else "image" if suffix in pp.SUFFIXES else "video"
                if suffix in VIDEO_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else None)
        if kind and p.is_file():
            seen[kind].append(p)
    clips = bool(seen["gif"]) and not seen["image"] and (bool(seen["video"]) or any(map(_animated, seen["gif"])))
    images, videos = seen["image"] + seen["gif"] * (not clips), seen["video"] + seen["gif"] * clips
    present = {k: v for k, v in (("image", images), ("video", videos), ("audio", seen["audio"])) if v}
    if len(present) > 1:
        (a, fa), (b, fb) = list(present.items())[:2]
        raise DataError(f"{root}: mixes {a} files ({len(fa)}, e.g. {fa[0]}) and {b} files ({len(fb)}, e.g. {fb[0]}); "
                        "a data set holds one kind", key="src")
    found = next(iter(present), None)
    if modality is not None:
        if found is not None and modality != found and not (modality == "video" and found == "image"):
            raise DataError(f"{root}: holds {found} files, not {modality}", key="modality")
        return modality
    return found or "image"  # no media at all: the image preparation says what it looked for
