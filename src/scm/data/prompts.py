"""Captions and prompt embeddings in a prepared directory (`scm.data.prepared`: the layout is in its docstring):
writing them beside the items as they are appended (`CaptionSpec`, `PromptWriter`), reading them back with
bounded memory (`CaptionLines`, `TextRows`), and `encode_captions`, what `scm data encode --text-encoder` does.

Each caption is encoded by the text encoder (`scm.text`: per-token embeddings [T, D], a padding mask [T] and a
pooled embedding [P]), in batches of `CaptionSpec.batch` distinct captions, and stored in `CaptionSpec.dtype`
(float16 by default: an embedding that float16 cannot hold is an error naming the setting). A caption that recurs
is encoded once as long as its embedding is among the last CACHE_BYTES (32 MiB) of distinct captions encoded
(template captions such as captioned MNIST's 1,090 distinct ones are encoded once each). The empty prompt's
embedding, the unconditional input of classifier-free guidance, is stored too (text_null.safetensors, with its
digest: `scm.integrity`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scm.data.rows import RowFile, choose
from scm.errors import DataError
from scm.text import MAX_PROMPT_CHARS

__all__ = ["CaptionLines", "CaptionSpec", "PromptWriter", "TextRows", "caption_stats", "encode_captions"]

CAPTIONS = "captions.jsonl"
NULL = "text_null.safetensors"
TEXT_DTYPES = ("float16", "float32")
CACHE_BYTES = 32 * 2**20  # the embeddings of the most recent distinct captions kept, not to encode them again


def _line(captions) -> bytes:
    return json.dumps(list(captions), ensure_ascii=False).encode() + b"\n"


def caption_stats(captions: Sequence[Sequence[str]]) -> tuple[int, int, str]:
    """(number of captions, their size as JSON lines in bytes, the SHA-256 of those lines) of a data set's captions
    (one list per item)."""
    h, rows, size = hashlib.sha256(), 0, 0
    for c in captions:
        line = _line(c)
        h.update(line)
        rows, size = rows + len(c), size + len(line)
    return rows, size, h.hexdigest()


@dataclass
class CaptionSpec:
    """What a `PreparedWriter` writes beside its items: at most `rows` captions (`nbytes` bytes as JSON lines), and
    with an `encoder` (a `scm.text.TextEncoder`) their embeddings in `dtype`, `batch` captions per encoder call."""

    rows: int
    nbytes: int
    encoder: object = None
    dtype: str = "float16"
    batch: int = 256

    def __post_init__(self):
        if self.dtype not in TEXT_DTYPES:
            raise DataError(f"dtype={self.dtype!r}: prompt embeddings are stored as {' or '.join(TEXT_DTYPES)}",
                            key="dtype")
        if not (isinstance(self.batch, int) and self.batch >= 1):
            raise DataError(f"batch={self.batch!r}: must be an integer >= 1", key="batch")

    @property
    def dims(self) -> tuple[int, int, int]:
        """(T, D, P): tokens, token width, pooled width."""
        e = self.encoder
        return int(e.max_tokens), int(e.width), int(e.pooled_width or 0)

    def row_bytes(self) -> int:
        """The bytes of one caption's embedding (tokens, mask, pooled)."""
        if self.encoder is None:
            return 0
        (t, d, p), size = self.dims, np.dtype(self.dtype).itemsize
        return t * d * size + t + p * size

    def total_bytes(self) -> int:
        """The bytes of every caption and its embedding."""
        return self.nbytes + self.rows * self.row_bytes()

    def key(self) -> dict:
        return {"captions": True, "encoder": None if self.encoder is None else self.encoder.spec,
                "text_dtype": self.dtype if self.encoder is not None else None}

    def describe(self) -> str:
        what = f"{self.rows} caption(s)"
        if self.encoder is None:
            return what
        t, d, p = self.dims
        return f"{what} embedded as {t}×{d}{f' + {p}' if p else ''} {self.dtype}"


class _RowWriter:
    """A preallocated file of rows [*shape] of `dtype`, written by positioned writes (`os.pwrite`): the rows
    written do not stay mapped in the process (a memory map's pages would count in its resident memory)."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...], rows: int):
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = self.row_bytes * rows
        if os.fstat(self.fd).st_size < size:  # preallocated (sparse where the file system allows)
            os.truncate(self.fd, size)

    def write(self, row: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        offset, done = row * self.row_bytes, 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def sync(self) -> None:
        getattr(os, "fdatasync", os.fsync)(self.fd)

    def close(self, rows: int | None = None) -> None:
        """Flush to disk (keeping `rows` rows, when given) and close."""
        if rows is not None:
            os.truncate(self.fd, rows * self.row_bytes)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None

    def __del__(self):  # an abandoned writer (an error, an interruption) closes its file
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def _check_item(captions, i: int) -> None:
    if not isinstance(captions, (list, tuple)) or not captions:
        raise DataError(f"item {i}: captions must be a non-empty list of strings, got {captions!r:.80}")
    for t in captions:
        if not isinstance(t, str) or len(t) > MAX_PROMPT_CHARS or "\x00" in t:
            raise DataError(f"item {i}: a caption must be text of at most {MAX_PROMPT_CHARS} characters without NUL, "
                            f"got {t!r:.80}")


class PromptWriter:
    """The captions (and embeddings) of the items a `PreparedWriter` appends, in its partial directory: files
    preallocated for `capacity` items and `spec.rows` captions, continued from the `progress` of an interrupted
    run (what its last append recorded: caption_bytes, caption_rows)."""

    def __init__(self, partial: Path, spec: CaptionSpec, capacity: int, written: int, progress: dict):
        self.partial, self.spec = Path(partial), spec
        self.rows = int(progress.get("caption_rows", 0)) if written else 0
        self.nbytes = int(progress.get("caption_bytes", 0)) if written else 0
        with open(self.partial / CAPTIONS, "ab") as f:
            f.truncate(self.nbytes)  # what an interrupted append wrote past its last record goes
        self.file = open(self.partial / CAPTIONS, "r+b")  # noqa: SIM115 (open while items are appended)
        self.file.seek(self.nbytes)
        self.arrays: dict[str, _RowWriter] = {}
        self.cache: dict[str, tuple] = {}  # caption → its (tokens, mask, pooled) in the storage dtype
        if spec.encoder is not None:
            t, d, p = spec.dims
            self.arrays = {"offsets": _RowWriter(self.partial / "text_offsets.bin", "<i8", (), capacity + 1),
                           "tokens": _RowWriter(self.partial / "text_tokens.bin", spec.dtype, (t, d), spec.rows),
                           "mask": _RowWriter(self.partial / "text_mask.bin", np.uint8, (t,), spec.rows)}
            if p:
                self.arrays["pooled"] = _RowWriter(self.partial / "text_pooled.bin", spec.dtype, (p,), spec.rows)
            self.arrays["offsets"].write(0, np.zeros(1))

    def _encode(self, prompts: list[str]) -> None:
        """Encode `prompts` (distinct, not cached) into the cache, in the storage dtype."""
        t, d, p = self.spec.dims
        dtype = getattr(torch, self.spec.dtype)
        for i in range(0, len(prompts), self.spec.batch):
            part = prompts[i: i + self.spec.batch]
            with torch.no_grad():
                got = self.spec.encoder.encode(part)
            if tuple(got.tokens.shape[1:]) != (t, d) or (p and (got.pooled is None or got.pooled.shape[1] != p)):
                raise DataError(f"the text encoder gives tokens {tuple(got.tokens.shape[1:])}, but declares ({t}, {d})"
                                f" and pooled width {p}", key="text_encoder")
            arrays = [got.tokens.to(dtype).cpu().numpy(), got.mask.cpu().numpy().astype(np.uint8)]
            arrays.append(got.pooled.to(dtype).cpu().numpy() if p else None)
            for k, v in (("tokens", arrays[0]), ("pooled", arrays[2])):
                if v is not None and not np.isfinite(v).all():
                    raise DataError(f"the text encoder's {k} embeddings hold values that {self.spec.dtype} cannot "
                                    "store (or NaN); store them as float32", key="dtype")
            for j, prompt in enumerate(part):
                self.cache[prompt] = tuple(None if v is None else v[j].copy() for v in arrays)

    def _embed(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Tokens, mask and pooled embeddings of `captions` (from the cache of the last CACHE_BYTES of distinct
        captions encoded; the others are encoded)."""
        self._encode([c for c in dict.fromkeys(captions) if c not in self.cache])
        rows = [self.cache[c] for c in captions]
        out = {"tokens": np.stack([r[0] for r in rows]), "mask": np.stack([r[1] for r in rows])}
        if rows[0][2] is not None:
            out["pooled"] = np.stack([r[2] for r in rows])
        while len(self.cache) * max(self.spec.row_bytes(), 1) > CACHE_BYTES:
            del self.cache[next(iter(self.cache))]  # the oldest first
        return out

    def append(self, captions: Sequence[Sequence[str]], start: int) -> dict:
        """Write the captions of items start … start + len(captions) − 1 (and their embeddings); flush; return what
        the writer records with the chunk."""
        for i, c in enumerate(captions):
            _check_item(c, start + i)
        flat = [t for c in captions for t in c]
        if self.rows + len(flat) > self.spec.rows:
            raise DataError(f"more captions than the {self.spec.rows} planned")
        lines = b"".join(_line(c) for c in captions)
        self.file.write(lines)
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.arrays and flat:  # (a chunk whose images were all skipped has no caption)
            a = self.rows
            for k, v in self._embed(flat).items():
                self.arrays[k].write(a, v)
            self.arrays["offsets"].write(start + 1, a + np.cumsum([len(c) for c in captions]))
            for v in self.arrays.values():
                v.sync()
        self.rows += len(flat)
        self.nbytes += len(lines)
        return {"caption_rows": self.rows, "caption_bytes": self.nbytes}

    def finish(self, items: int) -> dict:
        """Truncate the arrays to the items and captions written, write the empty prompt's embedding; return the
        meta.json fields: "captions" (their number) and, embedded, "text"."""
        from scm.integrity import write_tensors

        self.file.close()
        if not self.arrays:
            return {"captions": self.rows}
        t, d, p = self.spec.dims
        for name, array in self.arrays.items():
            array.close(items + 1 if name == "offsets" else self.rows)
        self.arrays.clear()
        with torch.no_grad():
            null = self.spec.encoder.encode([""]).cond()
        dtype = getattr(torch, self.spec.dtype)
        write_tensors({k: v.cpu().to(dtype) if v.is_floating_point() else v.cpu() for k, v in null.items()},
                      self.partial / NULL)
        text = {"encoder": self.spec.encoder.spec, "max_tokens": t, "width": d, "pooled_width": p,
                "captions": self.rows, "dtype": self.spec.dtype}
        return {"captions": self.rows, "text": text}


# -- reading ---------------------------------------------------------------------------------------------------------
def _line_ends(path: Path, block: int = 1 << 24) -> np.ndarray:
    """int64 [lines + 1]: where each line of `path` starts, then the file's size; read a block at a time."""
    starts, pos = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            starts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(chunk)
    ends = np.concatenate(starts)
    if ends[-1] != pos:
        raise DataError(f"{path}: the last line is unfinished (a truncated file?)")
    return ends


class CaptionLines(Sequence):
    """A prepared set's captions (captions.jsonl: one JSON list of strings per item) as a read-only sequence of
    lists, each read from the file when asked for; memory: 8 bytes an item (where each line starts)."""

    def __init__(self, path: Path, count: int, ends: np.ndarray | None = None, base: int = 0):
        self.path = Path(path)
        self.ends = _line_ends(self.path) if ends is None else ends
        if ends is None and len(self.ends) - 1 != count:
            raise DataError(f"{self.path}: {len(self.ends) - 1} lines, but meta.json describes {count} items "
                            "(a corrupt or truncated file)")
        self.base, self.count = base, count

    def view(self, start: int, stop: int) -> CaptionLines:
        """Items start … stop − 1 (of this view)."""
        return CaptionLines(self.path, stop - start, self.ends, self.base + start)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.read(range(self.count)[i])
        if not -self.count <= i < self.count:
            raise IndexError(f"item {i} of {self.count}")
        return self.read([i % self.count])[0]

    def read(self, items) -> list[list[str]]:
        """The captions of `items` (indices of this view, each in 0 … len − 1)."""
        out = []
        with open(self.path, "rb") as f:
            for i in items:
                g = self.base + int(i)
                f.seek(int(self.ends[g]))
                raw = f.read(int(self.ends[g + 1] - self.ends[g]))
                try:
                    caps = json.loads(raw)
                except ValueError as e:
                    raise DataError(f"{self.path}, line {g + 1}: not JSON ({e})") from None
                if not isinstance(caps, list) or not caps or not all(isinstance(t, str) for t in caps):
                    raise DataError(f"{self.path}, line {g + 1}: not a non-empty list of captions")
                out.append(caps)
        return out


class TextRows:
    """A prepared set's prompt embeddings (meta["text"] = `info`, `count` items), read by caption row: the offsets
    (8 bytes an item) in memory, the rows from disk by positioned reads (`scm.data.rows`), or all in memory when
    they are at most `in_memory_bytes`."""

    def __init__(self, path: Path, info: dict, count: int, in_memory_bytes: int):
        self.path = Path(path)
        try:
            t, d, p, m = (int(info[k]) for k in ("max_tokens", "width", "pooled_width", "captions"))
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path / 'meta.json'}: malformed \"text\" ({e})") from None
        if dtype not in TEXT_DTYPES or min(t, d, m) < 1 or p < 0:
            raise DataError(f"{path / 'meta.json'}: bad \"text\" ({dtype}, {t} tokens × {d}, pooled {p}, {m} captions)")
        size = np.dtype(dtype).itemsize
        shapes = {"text_offsets.bin": 8 * (count + 1), "text_tokens.bin": m * t * d * size, "text_mask.bin": m * t,
                  "text_pooled.bin": m * p * size}
        for name, nbytes in shapes.items():
            f = self.path / name
            if name == "text_pooled.bin" and not p:
                continue
            if not f.is_file():
                raise DataError(f"{f}: missing (the prepared data set is incomplete)")
            if f.stat().st_size != nbytes:
                raise DataError(f"{f}: {f.stat().st_size} bytes, but meta.json describes {nbytes} (a corrupt or "
                                "truncated file)")
        if not (self.path / NULL).is_file():
            raise DataError(f"{self.path / NULL}: missing (the prepared data set is incomplete)")
        self.offsets = np.fromfile(self.path / "text_offsets.bin", dtype="<i8").astype(np.int64)
        if self.offsets[0] != 0 or self.offsets[-1] != m or (np.diff(self.offsets) < 1).any():
            raise DataError(f"{self.path / 'text_offsets.bin'}: not the offsets of {m} captions, at least one an item")
        small = sum(v for k, v in shapes.items() if k != "text_offsets.bin") <= in_memory_bytes
        self.tokens = RowFile(self.path / "text_tokens.bin", dtype, (t, d), m, small)
        self.mask = RowFile(self.path / "text_mask.bin", np.uint8, (t,), m, small)
        self.pooled = RowFile(self.path / "text_pooled.bin", dtype, (p,), m, small) if p else None
        self._null = None

    def rows(self, items: np.ndarray, choice: torch.Generator | None) -> np.ndarray:
        """The caption row each item (int64 [B], of the whole set) takes: `scm.data.rows.choose`."""
        first = self.offsets[items]
        return first + choose(self.offsets[items + 1] - first, choice)

    def cond(self, rows: np.ndarray, device=None) -> dict[str, torch.Tensor]:
        """{"text": float32 [B, T, D], "text_mask": bool [B, T], "text_pooled": float32 [B, P] (if P > 0)}."""
        out = {"text": torch.from_numpy(self.tokens.read(rows)).float().to(device),
               "text_mask": torch.from_numpy(self.mask.read(rows)).bool().to(device)}
        if self.pooled is not None:
            out["text_pooled"] = torch.from_numpy(self.pooled.read(rows)).float().to(device)
        return out

    def null(self) -> dict[str, torch.Tensor]:
        """The empty prompt's tensors [1, T, …] (text_null.safetensors, its digest and values checked)."""
        from scm.integrity import read_tensors

        if self._null is None:
            got = read_tensors(self.path / NULL)
            self._null = {k: v.bool() if k == "text_mask" else v.float() for k, v in got.items()}
        return {k: v.clone() for k, v in self._null.items()}


# -- scm data encode --text-encoder -----------------------------------------------------------------------------------
def _own_resolution(src) -> int:
    """The side of the source's square images (an image folder: its first image's), or DataError (key
    "resolution") asking for one."""
    from scm.data import preprocess as pp
    from scm.data.prepare import list_images

    if isinstance(src, (str, Path)):
        files = list_images(Path(src).expanduser())
        if not files:
            raise DataError(f"{src}: no images found (searched recursively for {', '.join(pp.SUFFIXES)})", key="src")
        with pp.open_image(files[0], decode=False) as img:
            w, h = img.size
        what = f"{files[0]} is {w}×{h}"
    else:
        h, w = src.shape[-2:]
        what = f"{src.source}: its items are {h}×{w}"
    if h != w:
        raise DataError(f"{what}, not square: give the resolution R to prepare the images at (centre crop, area "
                        "resize)", key="resolution")
    return int(h)


def encode_captions(data, text_encoder, out: str | Path, *, vae: str | Path | None = None,
                    resolution: int | None = None, dtype: str = "float16", text_batch: int = 256, device="cpu",
                    progress: bool = True, resume: bool = True, log=print, **vae_options) -> Path:
    """A prepared directory `out` of the images of `data` (a name or path, or a data set `load_dataset` returned)
    with their captions and the captions' prompt embeddings by `text_encoder` ("builtin", a folder, a spec, or a
    `scm.text.TextEncoder`), stored as `dtype`; what `scm data encode --text-encoder` makes. With `vae` the items
    are the images' latents (`scm.data.latents.encode`, given `resolution`, `device` and `vae_options`); without,
    the images as `scm data prepare` stores them (uint8), at `resolution` or, by default, the source's own (square)
    size. Resumable, atomic and checked for disk space as those are; memory: one chunk of items and its
    captions' embeddings."""
    from scm.data import load_dataset
    from scm.data.prepare import _is_image_folder, prepare
    from scm.text import load_text_encoder

    named = isinstance(text_encoder, (str, Path, dict))
    encoder = load_text_encoder(text_encoder if isinstance(text_encoder, dict) else str(text_encoder),
                                device=device) if named else text_encoder
    if dtype not in TEXT_DTYPES:
        raise DataError(f"dtype={dtype!r}: prompt embeddings are stored as {' or '.join(TEXT_DTYPES)}", key="dtype")
    if vae is not None:
        from scm.data.latents import encode

        return encode(data, vae, out, dtype=dtype, resolution=resolution, device=device, progress=progress,
                      resume=resume, log=log, text_encoder=encoder, text_batch=text_batch, **vae_options)
    if Path(out).exists():
        raise DataError(f"{out} already exists; choose another output directory or remove it", key="out")
    folder = isinstance(data, (str, Path)) and _is_image_folder(str(data))
    src = data if folder or not isinstance(data, (str, Path)) else load_dataset(data)
    size = resolution if resolution is not None else _own_resolution(src)
    return prepare(src, out, resolution=size, progress=progress, resume=resume, log=log, text_encoder=encoder,
                   text_dtype=dtype, text_batch=text_batch)
