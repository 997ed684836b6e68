"""Checking a whole run directory: every checkpoint file and EMA snapshot verified as its readers verify it (header
bounds, the network's shapes, content digest, finite values: `scm.integrity`), and, on request, digests recorded
for the files written before scm recorded them (once they pass every other check), so that later reads verify them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from scm.errors import CheckpointError, UnverifiedWarning
from scm.files import atomic_write_json
from scm.integrity import read_tensors, write_tensors
from scm.nets.registry import build_net
from scm.runs import FILES_KEY, RunDir, ema_key, read_run_config, trained_keys, weight_shapes

__all__ = ["FileCheck", "check_run", "describe"]


@dataclass(frozen=True)
class FileCheck:
    path: Path
    status: str        # "intact", "unverified" (no digest: written before scm recorded them), "recorded" (its digest
    detail: str = ""   # was recorded now), or "damaged" (`detail` says why)


def check_run(path: str | Path, *, record: bool = False) -> list[FileCheck]:
    """Every checkpoint file and EMA snapshot of the run at `path`, checked (module docstring); with `record`, the
    unverified files that pass every other check get their digests (rewritten atomically, tensors unchanged)."""
    run = RunDir(path)
    cfg = read_run_config(run.path)
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        net = build_net(cfg.net, cfg.loss.sigma_d)
    shapes, keys = weight_shapes(net), trained_keys(net)  # (a LoRA student's checkpoints hold its trained part)
    expect = {"net": {k: tuple(v.shape) for k, v in net.state_dict().items() if keys is None or k in keys},
              "ema": {ema_key(s, k): v for s in cfg.ema.stds for k, v in shapes.items()}}
    results = []
    for ckpt in run.checkpoints():
        results += _check_checkpoint(ckpt, expect, record)
    snapshots = run.snapshots_dir.glob("*.safetensors") if run.snapshots_dir.is_dir() else []
    for snap in sorted(snapshots):
        results.append(_check_file(snap, None, None, record))
    return results


def _check_checkpoint(ckpt: Path, expect: dict, record: bool) -> list[FileCheck]:
    try:
        state = RunDir.read_state(ckpt)
    except CheckpointError as e:
        return [FileCheck(ckpt / "state.json", "damaged", str(e))]
    digests = state.get(FILES_KEY)
    names = sorted(digests) if digests is not None else sorted(p.name for p in ckpt.glob("*.safetensors"))
    results = [_check_file(ckpt / name, None if digests is None else digests[name],
                           expect.get(name.removesuffix(".safetensors")), record) for name in names]
    if record and digests is None and all(r.status == "recorded" for r in results):
        found = {r.path.name: r.detail for r in results}
        atomic_write_json(ckpt / "state.json", {**state, FILES_KEY: found})
        results = [FileCheck(r.path, "recorded") for r in results]
    return results


def _check_file(path: Path, digest: str | None, expect: dict | None, record: bool) -> FileCheck:
    """One file; for a file `record`ed now, `detail` carries its new digest."""
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", UnverifiedWarning)
        try:
            tensors = read_tensors(path, record=digest, expect=expect)
        except CheckpointError as e:
            return FileCheck(path, "damaged", str(e).removeprefix(f"{path}: "))
    if not notes:
        return FileCheck(path, "intact")
    if not record:
        return FileCheck(path, "unverified", "no content digest")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return FileCheck(path, "recorded", write_tensors(tensors, path, metadata))


def describe(results: list[FileCheck]) -> str:
    """One line of counts: '12 intact, 2 unverified, 1 damaged'."""
    counts = {s: sum(r.status == s for r in results) for s in ("intact", "recorded", "unverified", "damaged")}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no checkpoint or snapshot files"

