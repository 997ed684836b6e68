"""Package a diffusion run as the demo's released teacher: its config, one EMA (safetensors) and its state.

    python benchmarks/release_teacher.py RUN_DIR demo/teacher --ema 0.05 --notes NOTES.md

Keeps what `scm.runs.load_run` reads (config.json, checkpoints/latest, ema.safetensors, state.json without the
optimizer), one σ_rel only (the config's ema.stds is reduced to it), and writes README.md from the notes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from scm.integrity import read_tensors, write_tensors
from scm.runs import FILES_KEY, ema_stds_in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ema", type=float, required=True, help="σ_rel of the EMA to keep")
    ap.add_argument("--notes", type=Path, required=True, help="Markdown: command, training time, metric")
    args = ap.parse_args()
    ckpt_name = (args.run / "checkpoints" / "latest").read_text().strip()
    ckpt = args.run / "checkpoints" / ckpt_name
    tensors = read_tensors(ckpt / "ema.safetensors")  # verified: digest, shapes, finite values
    keep = [k for k in tensors if float(k.split("/", 1)[0]) == args.ema]
    if not keep:
        raise SystemExit(f"{ckpt}: no EMA with σ_rel={args.ema} (available: {ema_stds_in(tensors)})")
    if args.out.exists():
        shutil.rmtree(args.out)
    dst = args.out / "checkpoints" / ckpt_name
    dst.mkdir(parents=True)
    digest = write_tensors({k: tensors[k] for k in keep}, dst / "ema.safetensors")  # carries its digest
    state = json.loads((ckpt / "state.json").read_text())
    state = {k: v for k, v in state.items() if k not in ("optimizer", "scaler")}
    state[FILES_KEY] = {"ema.safetensors": digest}  # the one file the release holds
    (dst / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    (args.out / "checkpoints" / "latest").write_text(ckpt_name + "\n")
    cfg = json.loads((args.run / "config.json").read_text())
    cfg["ema"]["stds"] = [args.ema]
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copy(args.run / "metrics.jsonl", args.out / "metrics.jsonl")
    shutil.copy(args.notes, args.out / "README.md")
    print(f"released {ckpt} (EMA σ_rel={args.ema}) to {args.out}")


if __name__ == "__main__":
    main()
