"""The captions of an image folder, in one of two conventions:

- a sidecar text file per image: `cat.png` and `cat.txt` side by side (any image suffix; images that differ only
  in their suffix share it). One caption per non-empty line, stripped: several lines are several captions;
- a `metadata.jsonl` at the folder's root (Hugging Face's imagefolder convention): one JSON object per line with
  "file_name" (the image's path relative to the root, "/"-separated) and "text" (a caption, or a list of them);
  other fields are ignored, and so are blank lines.

A folder without either has no captions (a stray .txt that no image matches, e.g. a README.txt, is then ignored).
Once captions are used, every image needs at least one: an image without one, a caption file or a metadata line
for an image that is not there, a file that is not UTF-8 or a line that is not JSON is an error naming the file
and the line. A caption is at most `scm.text.MAX_PROMPT_CHARS` characters, without NUL characters.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from scm.errors import DataError
from scm.text import MAX_PROMPT_CHARS

__all__ = ["METADATA", "check_captions", "folder_captions"]

METADATA = "metadata.jsonl"


def folder_captions(root: Path, files: list[Path]) -> list[list[str]] | None:
    """The captions of the images `files` (under `root`), one list per image in their order, or None when the
    folder has none (module docstring)."""
    root = Path(root)
    sidecars = {f: f.with_suffix(".txt") for f in files}
    matched = [f for f, t in sidecars.items() if t.is_file()]
    meta = root / METADATA
    if meta.is_file():
        if matched:
            raise DataError(f"{root}: captions both in {METADATA} and in caption files (e.g. {sidecars[matched[0]]}); "
                            "keep one of the two", key="src")
        return _from_metadata(meta, root, files)
    if not matched:
        return None
    texts = set(sidecars.values())
    orphans = sorted(p for p in root.rglob("*.txt") if p.is_file() and p not in texts)
    if orphans:
        raise DataError(f"{orphans[0]}: a caption file without an image ({len(orphans)} such file(s); an image "
                        f"{orphans[0].stem}.png, .jpg, … is expected beside each)", key="src")
    missing = [f for f in files if f not in matched]
    if missing:
        raise DataError(f"{missing[0]}: no caption file ({missing[0].with_suffix('.txt').name}); {len(missing)} of the "
                        f"{len(files)} images have none, the others have one", key="src")
    cache: dict[Path, list[str]] = {}
    return [cache.setdefault(sidecars[f], _read_sidecar(sidecars[f])) for f in files]


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        raise DataError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})", key="src") from None


def _check(text: str, where: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise DataError(f"{where}: a caption of {len(text)} characters; at most {MAX_PROMPT_CHARS}", key="src")
    if "\x00" in text:
        raise DataError(f"{where}: a caption holds a NUL character", key="src")
    return text


def _read_sidecar(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the caption file ({e})", key="src") from None
    text = _decode(raw, path).removeprefix("\ufeff")
    captions = [_check(line.strip(), f"{path}, line {k}") for k, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    if not captions:
        raise DataError(f"{path}: no caption (the file is empty or blank)", key="src")
    return captions


def _entry(line: str, where: str) -> tuple[str, list[str]]:
    """(file_name, captions) of one metadata line."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not JSON ({e})", key="src") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a JSON object with file_name and text is expected, got {type(obj).__name__}",
                        key="src")
    name, text = obj.get("file_name"), obj.get("text")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: no file_name (the image's path relative to the folder)", key="src")
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"{where}: text must be a caption or a non-empty list of captions (non-empty strings), got "
                        f"{json.dumps(text)[:80]}", key="src")
    return name, [_check(t.strip(), where) for t in texts]


def _from_metadata(meta: Path, root: Path, files: list[Path]) -> list[list[str]]:
    index = {f.relative_to(root).as_posix(): i for i, f in enumerate(files)}
    captions: list[list[str] | None] = [None] * len(files)
    line_of: dict[int, int] = {}
    try:
        raw = meta.read_bytes()
    except OSError as e:
        raise DataError(f"{meta}: cannot read it ({e})", key="src") from None
    for k, chunk in enumerate(raw.split(b"\n"), 1):
        line = _decode(chunk, meta, k).removeprefix("\ufeff").strip()
        if not line:
            continue
        where = f"{meta}, line {k}"
        name, texts = _entry(line, where)
        i = index.get(PurePosixPath(name.replace("\\", "/")).as_posix())
        if i is None:
            raise DataError(f"{where}: file_name {name!r}: no such image in {root}", key="src")
        if i in line_of:
            raise DataError(f"{where}: file_name {name!r} again (first on line {line_of[i]})", key="src")
        captions[i], line_of[i] = texts, k
    missing = [f for f, c in zip(files, captions, strict=True) if c is None]
    if missing:
        raise DataError(f"{missing[0]}: no caption in {meta} ({len(missing)} of the {len(files)} images have none)",
                        key="src")
    return captions


def check_captions(captions, count: int, source: str) -> None:
    """DataError unless `captions` holds one non-empty list of strings per item (`count` items)."""
    if len(captions) != count:
        raise DataError(f"{source}: {count} items but captions for {len(captions)}")
    for i, c in enumerate(captions):
        if not isinstance(c, (list, tuple)) or not c or not all(isinstance(t, str) for t in c):
            raise DataError(f"{source}: item {i}: captions must be a non-empty list of strings, got {c!r:.80}")
