"""Convert a data set into a prepared directory (`scm.data.prepared`): memory-mapped 8-bit images for training
and evaluation with memory that does not grow with the data set.

Sources:
- a folder of images (recursive: PNG, JPEG, WebP, BMP, GIF (first frame), TIFF; the sorted file list; if every
  image sits in a first-level sub-folder, the sorted sub-folder names are the classes, as `load_folder` reads
  them). Files are decoded a chunk at a time (in a few threads), so a folder of any size fits;
- anything else `scm.data.load_dataset` opens ("mnist", "mnist:test", an .npz, an IDX or CIFAR-10 folder, a
  prepared directory): held in memory as it loads, written a chunk at a time.

Each image goes through `scm.data.preprocess` (modes, alpha, channels, and ADM/EDM2's centre crop with area
resize to R×R); 8-bit arrays already at R×R with the asked channels are written as they are. Arrays of floats
(e.g. latents) are written as float32 model-space values (`value_range` "raw") and are never resized.

Resumable: the writer's key is a hash of the sorted relative file list with the files' sizes (or of the
arrays), and the settings; after every chunk it records how many source files were consumed (and which were
skipped), so an interrupted run continues with the next file and gives the same bytes as an uninterrupted one.
Nothing appears under the output's name until the data set is complete.

An undecodable file is an error naming it; with `skip_bad` it is skipped, and the skipped files (the first
100, with the reasons) and their count are recorded in meta.json ("skipped", "skipped_count").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scm._checks import describe_shape
from scm.data import preprocess as pp
from scm.data.images import folder_labels
from scm.data.prepared import PreparedWriter, is_prepared
from scm.errors import DataError

__all__ = ["list_images", "prepare"]

SKIPPED_LISTED = 100
RULES = 1  # the version of the preprocessing rules, part of the resume key


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
    if not isinstance(resolution, int) or resolution < 1:
        raise DataError(f"resolution={resolution!r}: must be a positive integer (pixels)", key="resolution")
    if channels not in (None, 1, 3):
        raise DataError(f"channels={channels!r}: must be 1 (greyscale) or 3 (colour)", key="channels")
    if alpha not in pp.ALPHA:
        raise DataError(f"alpha={alpha!r}: must be one of {', '.join(pp.ALPHA)}", key="alpha")
    if not isinstance(chunk, int) or chunk < 1:
        raise DataError(f"chunk={chunk!r}: must be a positive integer", key="chunk")


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


def _write(writer: PreparedWriter, chunks, total: int, progress: bool, desc: str) -> tuple[list, int]:
    """Append the chunks (images, labels, consumed, newly skipped) after those already written; return the
    skipped files and their count, including those of an interrupted run."""
    done = writer.progress.get("consumed", 0)
    skipped, count = list(writer.progress.get("skipped", [])), int(writer.progress.get("skipped_count", 0))
    with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images, labels, consumed, bad in chunks(done):
            count += len(bad)
            skipped += bad[: max(0, SKIPPED_LISTED - len(skipped))]
            writer.append(images, labels, extra={"consumed": consumed, "skipped": skipped, "skipped_count": count})
            bar.update(consumed - bar.n)
    return skipped, count


def _prepare_folder(root: Path, out: Path, resolution: int, channels: int | None, alpha: str, skip_bad: bool,
                    chunk: int, progress: bool, resume: bool, workers: int, log) -> Path:
    files = list_images(root)
    if not files:
        raise DataError(f"{root}: no images found (searched recursively for {', '.join(pp.SUFFIXES)})", key="src")
    rel = [f.relative_to(root) for f in files]
    labels, names = folder_labels(rel)
    if channels is None:
        channels = _common_channels(files, root, progress)
    settings = {"resolution": resolution, "channels": channels, "alpha": alpha, "rules": RULES}
    key = _digest({"files": [[r.as_posix(), f.stat().st_size] for r, f in zip(rel, files, strict=True)],
                   "labelled": labels is not None, **settings})
    writer = PreparedWriter(out, (channels, resolution, resolution), "uint8", len(files), labelled=labels is not None,
                            key=key, resume=resume)

    def one(f: Path):
        try:
            return pp.preprocess_image(f, resolution, channels, alpha)
        except DataError as e:
            if not skip_bad:
                raise DataError(str(e), key="skip_bad") from None  # the setting that would skip it
            return e

    def chunks(start: int):
        with ThreadPoolExecutor(workers) as pool:
            for i in range(start, len(files), chunk):
                results = list(pool.map(one, files[i: i + chunk]))  # in order: the first bad file raises
                keep = [j for j, r in enumerate(results) if not isinstance(r, DataError)]
                bad = [{"file": rel[i + j].as_posix(), "reason": str(r)} for j, r in enumerate(results)
                       if isinstance(r, DataError)]
                images = (np.stack([results[j] for j in keep]) if keep
                          else np.empty((0, channels, resolution, resolution), np.uint8))
                yield images, None if labels is None else labels[i: i + chunk][keep], i + len(results), bad

    skipped, count = _write(writer, chunks, len(files), progress, f"preparing {root.name}")
    if writer.written == 0:
        shutil.rmtree(writer.partial)  # nothing to continue
        raise DataError(f"{root}: every one of the {len(files)} image(s) was skipped as undecodable", key="src")
    meta = {"source": str(root.resolve()), "class_names": names, "skipped": skipped, "skipped_count": count,
            "preprocessing": _preprocessing("adm-center-crop", alpha, resolution, channels)}
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
                     progress: bool, resume: bool, workers: int) -> Path:
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
    writer = PreparedWriter(out, (channels, resolution, resolution), dtype, n, labelled=labelled,
                            key=_digest({"data": _source_key(data), **settings}), resume=resume)

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
                yield x, y, i + len(x), []

    _write(writer, chunks, n, progress, "preparing")
    meta = {"source": data.source, "class_names": data.class_names, "skipped": [], "skipped_count": 0,
            "value_range": "raw" if floats else "uint8",
            "preprocessing": _preprocessing("none" if as_is else "adm-center-crop", alpha, resolution, channels)}
    if getattr(data, "latent", None):
        meta["latent"] = data.latent
    return writer.finish(meta)


def prepare(src: str | Path, out: str | Path, *, resolution: int, channels: int | None = None, alpha: str = "white",
            skip_bad: bool = False, chunk: int = 256, progress: bool = True, resume: bool = True,
            workers: int | None = None, log=print) -> Path:
    """Write `src` (an image folder, or anything `load_dataset` opens) as a prepared directory `out` of
    [channels, resolution, resolution] uint8 images (labels when the source has them); return `out`.

    `channels` None keeps the source's (1 or 3; a folder's images must then agree); `alpha` "white" or "drop"
    (images with transparency); `skip_bad` skips undecodable files (recorded in meta.json) instead of failing;
    `resume` continues an interrupted run (otherwise its partial output is discarded); `workers` decoding
    threads (default: the CPU count, at most 8)."""
    _check(resolution, channels, alpha, chunk)
    out, workers = Path(out), workers or min(8, os.cpu_count() or 1)
    if out.exists():  # before reading any source (the writer checks it too)
        raise DataError(f"{out} already exists; choose another output directory or remove it", key="out")
    if _is_image_folder(str(src)):
        return _prepare_folder(Path(src).expanduser(), out, resolution, channels, alpha, skip_bad, chunk, progress,
                               resume, workers, log)
    from scm.data import load_dataset

    return _prepare_dataset(load_dataset(src), out, resolution, channels, alpha, chunk, progress, resume, workers)
