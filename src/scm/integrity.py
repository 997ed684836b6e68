"""Verifying what is read: every safetensors file scm writes carries a content digest, and every reader checks the
file before it trusts a byte of it.

A safetensors file is an 8-byte little-endian header length N, a JSON header of N bytes (tensor name → dtype,
shape, byte range; "__metadata__" → strings), then the tensors' bytes. scm writes the SHA-256 of the header (in a
canonical form, without the digest itself) and of the data under the metadata key "scm_sha256" (`write_tensors`).
`read_tensors` then checks, in this order, so that nothing is mapped or allocated on the word of a bad header:

1. the header: N within the file's real size and `MAX_HEADER_BYTES`; every tensor's dtype known, its byte range
   inside the file and equal to its shape's size, the ranges tiling the data exactly (what safetensors itself
   requires), and, when the reader knows what it expects (a run's network), the names and shapes against those;
2. the content: the digest recomputed over the file equals the one it carries and the one its checkpoint recorded
   (`scm.runs`: a checkpoint's state.json lists the digest of each file it holds, so a file swapped from another
   checkpoint is found too);
3. the values: no NaN or infinity in a floating-point tensor.

A file written before scm recorded digests has none: it is read (steps 1 and 3 still apply) with one
`UnverifiedWarning`. Every failure is a CheckpointError naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from scm.errors import CheckpointError, UnverifiedWarning
from scm.files import atomic_write, sha256_of

__all__ = ["DIGEST_KEY", "MAX_HEADER_BYTES", "TensorHeader", "check_finite", "one_unverified_warning", "read_header",
           "read_tensors", "shape_differences", "verify_digest", "write_tensors"]

DIGEST_KEY = "scm_sha256"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorHeader:
    """A safetensors file's header, checked against the file (`read_header`)."""

    path: Path
    size: int                                  # the file's size in bytes
    header_bytes: int                          # N
    tensors: dict[str, dict]                   # name → {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.tensors.items()}

    @property
    def digest(self) -> str | None:
        """The digest the file carries (None: written before scm recorded them)."""
        return self.metadata.get(DIGEST_KEY)

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        names = self.tensors if names is None else names
        return sum(self.tensors[k]["data_offsets"][1] - self.tensors[k]["data_offsets"][0] for k in names)


def _canonical(tensors: dict, metadata: dict) -> bytes:
    """The header as hashed: sorted keys, no spaces, without the digest."""
    meta = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    return json.dumps({"__metadata__": meta, **tensors}, sort_keys=True, separators=(",", ":")).encode()


def read_header(path: str | Path) -> TensorHeader:
    """The header of `path`, checked against the file's real size before anything is mapped (module docstring,
    step 1 without expectations)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (its header claims {n} bytes; the file has "
                                      f"{size}, the limit is {MAX_HEADER_BYTES})")
            raw = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (metadata must map names to strings)")
    _check_layout(path, raw, size - 8 - n)
    return TensorHeader(path, size, n, raw, metadata)


def _check_layout(path: Path, tensors: dict, data_bytes: int) -> None:
    """Each tensor's dtype, shape and byte range are consistent, and the ranges tile the data exactly."""
    spans = []
    for name, entry in tensors.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or begin > end:
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {name[:80]!r}: {str(entry)[:120]})")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: corrupt safetensors header ({name[:80]!r} is {dtype} {shape} but spans "
                                  f"{end - begin} bytes)")
        spans.append((begin, end))
    needed = max((end for _, end in spans), default=0)
    if needed > data_bytes:
        raise CheckpointError(f"{path}: truncated (its header describes {needed} bytes of tensors, the file holds "
                              f"{data_bytes})")
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            break
        position = end
    if position != data_bytes:
        raise CheckpointError(f"{path}: corrupt safetensors file (its tensors cover {position} of its {data_bytes} "
                              "data bytes: extended or overlapping)")


def _content_digest(header: TensorHeader) -> str:
    h = sha256_of(header.path, 8 + header.header_bytes, into=hashlib.sha256(_canonical(header.tensors,
                                                                                       header.metadata)))
    return f"sha256:{h.hexdigest()}"


def write_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Tensors (moved to the CPU) into a safetensors file carrying its digest, written atomically (`scm.files`);
    returns the digest."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = memoryview(serialize(cpu, metadata={k: v for k, v in (metadata or {}).items() if k != DIGEST_KEY}))
    n = struct.unpack("<Q", blob[:8])[0]
    raw = json.loads(bytes(blob[8:8 + n]))
    meta = raw.pop("__metadata__", None) or {}
    data = blob[8 + n:]
    digest = f"sha256:{hashlib.sha256(_canonical(raw, meta) + data).hexdigest()}"
    header = json.dumps({"__metadata__": {**meta, DIGEST_KEY: digest}, **raw}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data start 8-byte aligned, as safetensors writes them

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            f.write(data)

    atomic_write(path, write)
    return digest


def shape_differences(expected: dict[str, tuple], found: dict[str, tuple], limit: int = 3) -> str | None:
    """The first differing tensors between what a network expects and what a file holds, in words (None: same)."""
    wrong = [f"{k} is {list(found[k])} in the file but {list(v)} in the network" for k, v in expected.items()
             if k in found and tuple(found[k]) != tuple(v)]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    parts = [*wrong[:limit]]
    if missing:
        parts.append(f"missing from the file: {', '.join(missing[:limit])}" + (" …" if len(missing) > limit else ""))
    if extra:
        parts.append(f"not in the network: {', '.join(extra[:limit])}" + (" …" if len(extra) > limit else ""))
    if not parts:
        return None
    return f"{len(wrong) + len(missing) + len(extra)} differing tensors ({'; '.join(parts)})"


def _all_finite(v: torch.Tensor) -> bool:
    """Every value finite: for 32 bits or fewer, by one float64 sum (finite exactly when every term is: 2^60 terms
    of at most fp32's 3.4e38 stay far below fp64's 1.8e308), faster than a mask; float64 values by the mask."""
    if v.dtype == torch.float64:
        return bool(torch.isfinite(v).all())
    return bool(torch.isfinite(v.sum(dtype=torch.float64)))


def check_finite(tensors: dict[str, torch.Tensor], source) -> None:
    """CheckpointError naming `source` and the first tensor holding NaN or infinity."""
    for name, v in tensors.items():
        if v.is_floating_point() and v.numel() and not _all_finite(v):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{source}: {name} holds {bad} non-finite value(s) (NaN or infinity): damaged or "
                                  "diverged weights are never used")


def read_tensors(path: str | Path, *, record: str | None = None, expect: dict[str, tuple] | None = None,
                 names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `path` (only `names`, when given), verified (module docstring): `record` is the digest a
    checkpoint recorded for the file, `expect` the names and shapes a network needs (the file must hold exactly
    those, or those among `names`)."""
    header = read_header(path)
    selected = list(header.tensors) if names is None else list(names)
    if expect is not None:
        found = header.shapes if names is None else {k: header.shapes[k] for k in selected if k in header.shapes}
        if diff := shape_differences(expect, found):
            raise CheckpointError(f"{path}: the weights do not fit the run's network (config.json): {diff}",
                                  key="weights")
    _check_memory(header, selected)
    verify_digest(header, record)
    if missing := [k for k in selected if k not in header.tensors]:
        raise CheckpointError(f"{path}: no tensor {missing[0]!r}")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in selected}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    check_finite(tensors, path)
    return tensors


@contextlib.contextmanager
def one_unverified_warning(what: str):
    """Within the block, the UnverifiedWarnings of several files (a checkpoint's, a run's snapshots) become one,
    naming `what` and how many files."""
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", UnverifiedWarning)
        yield
    unverified = [n for n in notes if issubclass(n.category, UnverifiedWarning)]
    for note in notes:
        if not issubclass(note.category, UnverifiedWarning):
            warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    if len(unverified) == 1:
        warnings.warn(unverified[0].message, stacklevel=3)
    elif unverified:
        warnings.warn(UnverifiedWarning(f"{what}: {len(unverified)} files written without a content digest (before "
                                        "scm verified what it reads): loaded unverified"), stacklevel=3)


def _check_memory(header: TensorHeader, names: list[str]) -> None:
    """A file that would not fit in memory is refused before it is read (a sane bound when nothing else is known)."""
    from scm.devices import available_memory

    need, have = header.nbytes([k for k in names if k in header.tensors]), available_memory()
    if have is not None and need > have:
        raise CheckpointError(f"{header.path}: its tensors need {need / 2**30:.1f} GiB of memory, this machine has "
                              f"{have / 2**30:.1f} GiB available")


def verify_digest(header: TensorHeader, record: str | None = None) -> bool:
    """Check the file's content against the digest it carries and the one recorded for it (`record`); False (with an
    UnverifiedWarning) for a file written before scm recorded digests."""
    carried = header.digest
    if carried is None and record is None:
        warnings.warn(UnverifiedWarning(f"{header.path}: written without a content digest (before scm verified "
                                        "what it reads): loaded unverified"), stacklevel=3)
        return False
    if record is not None and carried != record:
        raise CheckpointError(f"{header.path}: not the file its checkpoint recorded (digest {carried} in the file, "
                              f"{record} in state.json)")
    actual = _content_digest(header)
    if actual != carried:
        raise CheckpointError(f"{header.path}: damaged (its content does not match its digest {carried[:20]}…: "
                              "corrupted on disk or modified)")
    return True
