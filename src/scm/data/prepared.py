"""Prepared data sets: one directory of memory-mapped arrays, read with memory that does not grow with its size.

A prepared directory (made by `scm data prepare` from images, video or audio, `scm data fetch moving-mnist`, or
`scm data encode` from images through a VAE and/or from captions through a text encoder):

    DIR/meta.json    {"format": "scm-prepared", "version": 1, "count": N, "shape": [C, H, W] (video [C, T, H, W],
                      audio [C, L]), "modality": "image" | "video" | "audio" (absent: "image"), for video "fps",
                      "frames" (= T) and "stride" (frames between the starts of clips cut from one file), for
                      audio "sample_rate" (`scm.data.modality`), "dtype": "uint8" |
                      "float16" | "float32", "value_range": "uint8" | "raw", "labelled": bool, "class_names": [...] |
                      null, "source": ..., plus what made it: "preprocessing", "latent", "skipped", ...; for a
                      captioned set "captions": M (the number of captions), and when they are embedded "text":
                      {"encoder": the text encoder's spec, "max_tokens": T, "width": D, "pooled_width": P,
                      "captions": M, "dtype": "float16" | "float32"}}
    DIR/images.bin   N·C·H·W values of `dtype` (N·C·T·H·W, N·C·L), C order, little-endian: np.memmap(shape=(N,
                     *shape))
    DIR/labels.bin   N int64 labels (when labelled)
    captioned sets (meta "captions"):
    DIR/captions.jsonl       N lines, line i a JSON list of item i's captions (at least one each; UTF-8)
    and with embeddings (meta "text"; row r is the r-th caption in the order of captions.jsonl):
    DIR/text_offsets.bin     int64 [N + 1]: item i's captions are rows offsets[i] … offsets[i+1] − 1 (offsets[0] = 0,
                             offsets[N] = M)
    DIR/text_tokens.bin      [M, T, D] of the text dtype: each caption's per-token embeddings, padded to T
    DIR/text_mask.bin        uint8 [M, T]: 1 on a real token, 0 on padding
    DIR/text_pooled.bin      [M, P] of the text dtype: pooled embeddings (only when P > 0)
    DIR/text_null.safetensors  the empty prompt's "text" [1, T, D], "text_mask" bool [1, T] and "text_pooled"
                             [1, P], in the text dtype, with its digest (`scm.integrity`): the unconditional input
                             of classifier-free guidance
Readers of sets written before captions existed see no "captions" (nothing changed for them); a reader that
knows no captions reads a captioned set's images and labels as before. Sets written before video and audio
existed have no "modality" and are images; every set written now records its modality (images too).

Writing goes to DIR.partial/, which records after every appended chunk how many items are on disk (its data
flushed first), so an interrupted run continues where it stopped (`PreparedWriter(..., resume=True)`) and a
crash leaves no half-written directory under DIR's name: `finish()` truncates the arrays to the items written,
writes meta.json and renames DIR.partial to DIR. Captions and their embeddings are appended with their items
(`scm.data.prompts`), in the same record.

Before anything is written, the writer checks that the items still to be written fit in the free space of the
output's file system (`check_disk`; its arrays are preallocated as sparse files of the full size), and an error
names the numbers. Inside `removed_on_error()`, the partial directories of the writers opened in the block that hold
no finished item are removed when it raises (those with progress are kept, for the same command to continue).

Reading (`PreparedData`) gathers each batch by index with positioned reads (`os.pread`, in sorted order for
locality) into a fresh buffer; only the labels are held in memory (8 bytes per item). The pages read stay in the
OS page cache, not in the process: its resident memory does not grow with the data set (a memory map's pages
would count in its RSS as random batches touch them: with the kernel's large folios, one random batch of 256
maps hundreds of MB). `images` is a read-only memory map of the whole array, for sequential scans. A small set
(images.bin ≤ 64 MiB, e.g. MNIST's 45 MB) is read into memory once instead, since positioned reads cost about
1 µs per item in Python; `load_prepared(path, in_memory=...)` overrides the choice. Prompt embeddings are read
the same way, by caption row (in memory when their files total at most 64 MiB), with the caption offsets in
memory (8 bytes per item); captions as text are read from captions.jsonl when asked for (`caption_of`), with
where each line starts in memory (8 bytes per item). Values are checked where they enter, i.e. when they are
written.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from scm.data.images import ArrayShape
from scm.data.modality import MODALITIES, check_media, describe_items, media_of, modality_of
from scm.data.prompts import CaptionLines, CaptionSpec, PromptWriter, TextRows
from scm.data.rows import read_rows
from scm.errors import DataError
from scm.files import atomic_write_json, publish_folder

__all__ = ["FORMAT", "PreparedData", "PreparedWriter", "allocated", "check_disk",
           "describe_bytes", "is_prepared", "load_prepared", "removed_on_error"]

FORMAT, VERSION = "scm-prepared", 1
DTYPES = ("uint8", "float16", "float32")
IN_MEMORY_BYTES = 64 * 2**20  # prepared sets up to this size are read into memory by default
VALUE_RANGES = ("uint8", "raw")
_OPENED: contextvars.ContextVar[list | None] = contextvars.ContextVar("scm_prepared_opened", default=None)


def describe_bytes(n: int | float) -> str:
    """A size as people read it: 1.5 GB (decimal units, as disk sizes are sold)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_disk(out: str | Path, need: int, what: str) -> None:
    """DataError (key "out") unless `need` bytes (`what` they hold, in words) fit in the free space of the file
    system `out` will be on (that of its nearest existing folder)."""
    folder = Path(out).absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DataError(f"{out}: {what} need {describe_bytes(need)} of disk space, but {describe_bytes(free)} is free "
                        f"on the file system of {folder}", key="out")


def allocated(partial: Path) -> int:
    """The bytes the arrays of a partial directory (an interrupted run's) hold on disk already (0: none)."""
    if not Path(partial).is_dir():
        return 0
    return sum(getattr(f.stat(), "st_blocks", 0) * 512 for f in Path(partial).glob("*.bin"))


@contextlib.contextmanager
def removed_on_error() -> Iterator[list[PreparedWriter]]:
    """Within the block, the `PreparedWriter`s opened are recorded (the list yielded); when the block raises, the
    partial directories that hold no finished item are removed (an error leaves no empty temporary directory
    behind), and those that do are kept, for the same command to continue where it stopped (as after an
    interruption): hours of encoding are not lost to an out-of-memory error or a full disk."""
    opened: list[PreparedWriter] = []
    token = _OPENED.set(opened)
    try:
        yield opened
    except BaseException:
        for writer in opened:
            if writer.written == 0:
                shutil.rmtree(writer.partial, ignore_errors=True)
        raise
    finally:
        _OPENED.reset(token)


def is_prepared(path: Path) -> bool:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


class PreparedWriter:
    """Append items to DIR.partial/ and turn it into DIR with `finish()`.

    `key` identifies what is being written (the source's file list, the settings): a partial directory left
    by an interrupted run is continued only when its key is the same, otherwise it is an error (or, with
    `resume=False`, discarded). `capacity` is the most items that will be appended. `captions`: the items'
    captions are appended with them (and embedded, with its encoder: `scm.data.prompts.CaptionSpec`).
    """

    def __init__(self, out: str | Path, shape: tuple[int, ...], dtype: str, capacity: int, *, labelled: bool,
                 key: str, resume: bool = True, captions: CaptionSpec | None = None):
        self.out = Path(out)
        if dtype not in DTYPES:
            raise DataError(f"dtype {dtype!r}: must be one of {DTYPES}", key="dtype")
        if self.out.exists():
            raise DataError(f"{self.out} already exists; choose another output directory or remove it", key="out")
        modality_of(tuple(shape), str(self.out))  # (C, H, W), (C, T, H, W) or (C, L)
        if captions is not None:
            key = f"{key}|{json.dumps(captions.key(), sort_keys=True)}"
        self.shape, self.dtype, self.capacity, self.labelled, self.key = tuple(shape), dtype, capacity, labelled, key
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.progress_path = self.partial / "progress.json"
        self.written = 0
        if self.partial.exists():
            progress = self._read_progress()
            if progress is not None and progress.get("key") == key and resume:
                self.written = int(progress["written"])
            elif resume and progress is not None:
                raise DataError(f"{self.partial} holds an interrupted preparation of something else (another source "
                                "or other settings); remove it, or prepare into another directory", key="out")
            else:
                shutil.rmtree(self.partial)
        item = int(np.prod(self.shape)) * np.dtype(dtype).itemsize
        left = capacity - self.written
        text = 0 if captions is None else -(-captions.total_bytes() * left // capacity)  # their share, rounded up
        check_disk(self.out, left * (item + 8 * labelled) + text,
                   f"{left} item(s) of {'×'.join(map(str, self.shape))} {dtype}{' with labels' if labelled else ''}"
                   f"{'' if captions is None else ' and ' + captions.describe()}")
        if _OPENED.get() is not None:
            _OPENED.get().append(self)
        self.partial.mkdir(parents=True, exist_ok=True)
        for name, size in (("images.bin", item), ("labels.bin", 8)):
            if name == "labels.bin" and not labelled:
                continue
            with open(self.partial / name, "ab") as f:  # preallocate (sparse where the file system allows)
                f.truncate(max(os.fstat(f.fileno()).st_size, size * capacity))
        self.images = np.memmap(self.partial / "images.bin", dtype=dtype, mode="r+", shape=(capacity, *self.shape))
        self.labels = (np.memmap(self.partial / "labels.bin", dtype="<i8", mode="r+", shape=(capacity,))
                       if labelled else None)
        if self.written == 0:
            self._save_progress()
        self.prompts = (None if captions is None else
                        PromptWriter(self.partial, captions, capacity, self.written, self._read_progress() or {}))

    def _read_progress(self) -> dict | None:
        try:
            return json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return None

    def _save_progress(self, extra: dict | None = None) -> None:
        atomic_write_json(self.progress_path, {"key": self.key, "written": self.written, **(extra or {})})

    @property
    def progress(self) -> dict:
        """What the last `append` recorded with its `extra` (e.g. how many source files were consumed)."""
        return self._read_progress() or {}

    def append(self, images: np.ndarray, labels: np.ndarray | None = None, extra: dict | None = None,
               captions=None) -> None:
        """Write a chunk [n, *shape] (and its n labels, its n lists of captions) after the items already written;
        flush; record it."""
        n = images.shape[0]
        if tuple(images.shape[1:]) != self.shape:
            raise DataError(f"chunk of shape {tuple(images.shape)} does not match the data set's item shape "
                            f"{self.shape}")
        if self.written + n > self.capacity:
            raise DataError(f"more items than the capacity {self.capacity}")
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise DataError("the chunk contains NaN or Inf values")
        if (labels is None) == self.labelled:
            raise DataError("labels must be given exactly when the data set is labelled")
        if (captions is None) != (self.prompts is None) or (captions is not None and len(captions) != n):
            raise DataError("captions (one list per item) must be given exactly when the data set is captioned")
        self.images[self.written:self.written + n] = images
        self.images.flush()
        if self.labelled:
            self.labels[self.written:self.written + n] = labels
            self.labels.flush()
        if self.prompts is not None:
            extra = {**(extra or {}), **self.prompts.append(captions, self.written)}
        self.written += n
        self._save_progress(extra)

    def finish(self, meta: dict) -> Path:
        """Truncate to the items written, write meta.json, and rename DIR.partial to DIR (atomically). `meta` gives
        the video's fps, frames and stride or the audio's sample_rate (`scm.data.modality`); "modality" follows
        from the shape."""
        if self.written == 0:
            raise DataError("no items were written: the data set would be empty")
        del self.images, self.labels  # unmap before truncating
        item = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        os.truncate(self.partial / "images.bin", item * self.written)
        if self.labelled:
            os.truncate(self.partial / "labels.bin", 8 * self.written)
        modality = modality_of(self.shape)
        if meta.get("modality", modality) != modality:
            raise DataError(f"modality {meta['modality']!r} for items of shape {self.shape} (they are {modality})")
        check_media(modality, self.shape, meta, str(self.out))
        full = {"format": FORMAT, "version": VERSION, "count": self.written, "shape": list(self.shape),
                "modality": modality, "dtype": self.dtype, "labelled": self.labelled, **meta}
        full.setdefault("value_range", "uint8" if self.dtype == "uint8" else "raw")
        full.setdefault("class_names", None)
        if self.prompts is not None:
            full.update(self.prompts.finish(self.written))
        if full["value_range"] not in VALUE_RANGES:
            raise DataError(f"value_range {full['value_range']!r}: must be one of {VALUE_RANGES}")
        atomic_write_json(self.partial / "meta.json", full)
        self.progress_path.unlink()
        return publish_folder(self.partial, self.out)


class PreparedData(ArrayShape):
    """A prepared directory as a data set (`scm.data.dataset.Dataset`, as `ImageData`), its items read from disk by
    batch (or, small, in memory); its captions (`captions`, read when asked for) and prompt embeddings (`text`)
    where it has them."""

    def __init__(self, path: str | Path, meta: dict, images: np.ndarray, labels: torch.Tensor | None, start: int = 0,
                 in_memory: bool = False, captions: CaptionLines | None = None, text_rows: TextRows | None = None):
        self.path, self.meta, self.images, self.labels = Path(path), meta, images, labels
        self.in_memory = in_memory  # images is an in-memory array (else a memory map, and batches are read)
        self._start = start  # index of images[0] in images.bin (a subset is a view)
        self._item_bytes = int(np.prod(images.shape[1:])) * images.dtype.itemsize
        self._fd: tuple[int, int] | None = None  # (pid, descriptor): a forked worker opens its own
        self.source = f"{meta.get('source', self.path)} (prepared: {self.path})"
        self.class_names = meta.get("class_names")
        self.value_range = meta["value_range"]
        self.captions = captions  # one list of captions per item (this view's), or None
        self._text = text_rows  # the prompt embeddings of the whole set (indexed from item 0 of images.bin)

    @property
    def latent(self) -> dict | None:
        """How the items were encoded (VAE, normalisation), for decoding; None for pixels."""
        return self.meta.get("latent")

    @property
    def modality(self) -> str:
        """meta.json's "modality" ("image" for sets written before it was recorded; checked against the shape)."""
        return self.meta.get("modality", "image")

    @property
    def media(self) -> dict | None:
        """Video: {"fps", "frames", "stride"}; audio: {"sample_rate"}; images: None."""
        return media_of(self.meta) or None

    @property
    def text(self) -> dict | None:
        """How the captions were embedded (meta["text"]: encoder, max_tokens, width, pooled_width, captions,
        dtype), or None."""
        return self.meta.get("text")

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1 if self.value_range == "uint8" else x.float()

    def _descriptor(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path / "images.bin", os.O_RDONLY))
        return self._fd[1]

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])

    def gather(self, index) -> torch.Tensor:
        """The stored items at `index` (any integer sequence), read in sorted order, returned in the given one."""
        idx = self._items(index)
        if self.in_memory:
            return torch.from_numpy(self.images[idx])
        return torch.from_numpy(read_rows(self._descriptor(), idx, self._item_bytes, self.images.dtype,
                                          self.images.shape[1:], self._start, self.path / "images.bin"))

    def batch(self, index: torch.Tensor, device=None, choice: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Items `index` in the model's space on `device`, and their conditioning tensors (`conditions`); for a set
        with prompt embeddings, each item's caption is drawn uniformly among its captions with the CPU generator
        `choice`, or is its first one when `choice` is None (`caption_of` tells which)."""
        x, cond = self.to_model(self.gather(index)).to(device), self._conditioning(index, device)
        if self._text is not None:
            cond |= self._text.cond(self._text.rows(self._items(index) + self._start, choice), device)
        return x, cond

    def _captions_at(self, idx: np.ndarray) -> list[list[str]]:
        return self.captions.read(idx)

    def null_text(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embedding ("text" [1, T, D], "text_mask" [1, T], "text_pooled" [1, P]), read from
        text_null.safetensors with its digest checked: the unconditional input of classifier-free guidance."""
        if self._text is None:
            raise DataError(f"{self.source}: no prompt embeddings (scm.data.prompts.encode_captions makes them)",
                            key="data")
        return self._text.null()

    def subset(self, start: int, stop: int | None = None, source: str | None = None) -> PreparedData:
        """Items start … stop − 1 (a view of the same files)."""
        span = range(len(self))[slice(start, stop)]
        first = span.start if len(span) else 0
        sl = slice(start, stop)
        captions = None if self.captions is None else self.captions.view(first, first + len(span))
        sub = PreparedData(self.path, self.meta, self.images[sl], None if self.labels is None else self.labels[sl],
                           start=self._start + first, in_memory=self.in_memory, captions=captions,
                           text_rows=self._text)
        sub.source = source or sub.source
        return sub

    def describe(self) -> str:
        classes = f", {self.num_classes} classes" if self.labels is not None else ", unlabelled"
        space = "8-bit pixels → [-1, 1]" if self.value_range == "uint8" else f"{self.meta['dtype']} values used as is"
        what = ("latents" if self.latent else "images") if self.modality == "image" else None
        how = "read into memory" if self.in_memory else "read from disk by batch"
        captions = ""
        if self.captions is not None:
            text = self.text
            captions = (f", {self.meta.get('captions', '?')} captions" + (
                f" with {text['encoder'].get('kind', '?')} prompt embeddings" if text else ""))
        items = describe_items(len(self), self.shape, self.media, what)
        return f"{self.source}: {items}{classes}{captions} ({space}; {how})"


def load_prepared(path: str | Path, in_memory: bool | None = None) -> PreparedData:
    """Open a prepared directory; every inconsistency names the file. `in_memory`: read the images (and prompt
    embeddings) into memory (None: those whose files total at most IN_MEMORY_BYTES)."""
    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read the prepared data set's metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: not a prepared data set (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{meta_path}: version {meta.get('version')!r} of the format; this scm reads {VERSION}")
    try:
        count, shape, dtype = int(meta["count"]), tuple(int(s) for s in meta["shape"]), meta["dtype"]
        labelled, value_range = bool(meta["labelled"]), meta["value_range"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: missing or malformed field ({e})") from None
    modality = meta.get("modality", "image")
    if dtype not in DTYPES or value_range not in VALUE_RANGES or count < 1 or modality not in MODALITIES:
        raise DataError(f"{meta_path}: bad dtype/value_range/count/modality ({dtype}, {value_range}, {count}, "
                        f"{modality})")
    check_media(modality, shape, meta, str(meta_path))  # the shape fits the modality; its timing is complete
    files = [("images.bin", count * int(np.prod(shape)) * np.dtype(dtype).itemsize)]
    if labelled:
        files.append(("labels.bin", count * 8))
    if meta.get("captions") or meta.get("text"):
        files.append(("captions.jsonl", None))
    for name, size in files:
        f = path / name
        if not f.is_file():
            raise DataError(f"{f}: missing (the prepared data set is incomplete)")
        if size is not None and f.stat().st_size != size:
            raise DataError(f"{f}: {f.stat().st_size} bytes, but meta.json describes {size} "
                            "(a corrupt or truncated file)")
    asked = in_memory
    if in_memory is None:
        in_memory = files[0][1] <= IN_MEMORY_BYTES
    if in_memory:
        images = np.fromfile(path / "images.bin", dtype=dtype).reshape(count, *shape)
    else:
        images = np.memmap(path / "images.bin", dtype=dtype, mode="r", shape=(count, *shape))
    labels = None
    if labelled:
        labels = torch.from_numpy(np.fromfile(path / "labels.bin", dtype="<i8").astype(np.int64))
        if bool((labels < 0).any()):
            raise DataError(f"{path / 'labels.bin'}: labels must be >= 0")
    captioned = bool(meta.get("captions")) or bool(meta.get("text"))
    captions = CaptionLines(path / "captions.jsonl", count) if captioned else None
    text_memory = IN_MEMORY_BYTES if asked is None else (2**62 if asked else -1)
    text = TextRows(path, meta["text"], count, text_memory) if meta.get("text") else None
    return PreparedData(path, meta, images, labels, in_memory=in_memory, captions=captions, text_rows=text)
