"""Faults injected into run directories and commands, tried through the command line: what each `scm` version does.

    PYTHONPATH=<checkout>/src python benchmarks/faults.py OUT --label before|after
    python benchmarks/faults.py --table OUT/before.json OUT/after.json > benchmarks/results/reliability-faults.md

Each case copies a tiny trained run (three checkpoints), damages it or asks for something wrong, runs one `scm`
command and records its exit code, whether it printed a traceback, its first error line, and, for a command that
exited 0 where it should not have, what it produced (images all black, NaN in a new checkpoint, weights read from
another run). The damage is done with plain file operations and numpy, never with scm, so both versions meet the same
bytes. The cases are those of the reliability audit that concern run directories (CPU, about three minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN = ["--kimg", "0.012", "--batch", "4", "progress=false", "tensorboard=false", "sample_every_kimg=0",
         "ckpt_every_kimg=0.004", "keep_ckpts=3"]
SAMPLE = ["--nfe", "3", "--n", "4", "--seed", "1"]


def scm(*args, timeout=600) -> dict:
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "scm", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    notes = [line.removeprefix("warning: ") for line in p.stderr.splitlines()
             if line.startswith(("resumed from", "warning: skipped checkpoint"))]
    return {"rc": p.returncode, "traceback": "Traceback" in p.stderr, "seconds": round(time.monotonic() - start, 1),
            "message": (errors[0] if errors else last)[:240], "notes": [n[:160] for n in notes]}


def newest(run: Path) -> Path:
    ckpts = sorted(p for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    return ckpts[-1]


def data_offset(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def png_pixels(path: Path):
    from PIL import Image

    return np.asarray(Image.open(path)) if path.is_file() else None


def nan_in(path: Path) -> bool:
    from safetensors.numpy import load_file

    return any(np.isnan(v).any() for v in load_file(str(path)).values() if v.dtype.kind == "f")


def overwrite(path: Path, offset: int, data: bytes) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset:offset + len(data)] = data
    path.write_bytes(bytes(blob))


# -- the cases: each gets a fresh copy of the trained run and returns what the command did -------------------------
def bit_flip(run, work, base):
    path = newest(run) / "ema.safetensors"
    header = json.loads(path.read_bytes()[8:data_offset(path)])
    first = min(k.split("/")[0] for k in header if k != "__metadata__")  # the default EMA (the run's first σ_rel)
    name = max((k for k in header if k.startswith(first + "/")), key=lambda k: np.prod(header[k]["shape"]))
    at = data_offset(path) + header[name]["data_offsets"][0] + 4 * 7 + 3  # the exponent byte of one float32
    overwrite(path, at, bytes([path.read_bytes()[at] ^ 0x40]))
    r = scm("sample", "--ckpt", run, "--out", work / "x.png", *SAMPLE)
    return {**r, "output": "images differ from the intact run's" if r["rc"] == 0 and
            not np.array_equal(png_pixels(work / "x.png"), base["pixels"]) else None}


def nan_4k(run, work, base):
    path = newest(run) / "ema.safetensors"
    overwrite(path, data_offset(path), np.full(1024, np.nan, np.float32).tobytes())
    r = scm("sample", "--ckpt", run, "--out", work / "x.png", *SAMPLE)
    pixels = png_pixels(work / "x.png")
    return {**r, "output": f"images written (max pixel {int(pixels.max())})" if r["rc"] == 0 else None}


def truncated(run, work, base):
    path = newest(run) / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    return scm("sample", "--ckpt", run, "--out", work / "x.png", *SAMPLE)


def resume_after_nan(run, work, base):
    run = work / "own"  # trained where it is resumed (a run's configuration records its directory)
    assert scm("train", "--preset", "tiny-28-diffusion", "--data", base["data"], "--out", run, *TRAIN)["rc"] == 0
    for stem in ("net", "ema"):
        path = newest(run) / f"{stem}.safetensors"
        overwrite(path, data_offset(path), np.full(1024, np.nan, np.float32).tobytes())
    r = scm("train", "--preset", "tiny-28-diffusion", "--data", base["data"], "--out", run, *TRAIN[2:],
            "--kimg", "0.016", "--batch", "4", "--resume")
    bad = r["rc"] == 0 and nan_in(newest(run) / "net.safetensors")
    return {**r, "output": "the new checkpoint holds NaN" if bad else None,
            "good": None if bad or r["rc"] else f"{'; '.join(r['notes'])}; the new checkpoint is finite"}


def latest_outside(run, work, base):
    other = work / "other"
    shutil.copytree(run, other)
    (run / "checkpoints" / "latest").write_text(f"../../other/checkpoints/{newest(other).name}\n")
    shutil.rmtree(newest(run))  # were `latest` ignored, the run's own checkpoint 2 would load
    r = scm("sample", "--ckpt", run, "--out", work / "x.png", *SAMPLE)
    return {**r, "output": "weights read from another directory" if r["rc"] == 0 else None}


def config_mismatch(run, work, base):
    cfg = json.loads((run / "config.json").read_text())
    cfg["net"]["model_channels"] *= 2
    (run / "config.json").write_text(json.dumps(cfg))
    return scm("sample", "--ckpt", run, "--out", work / "x.png", *SAMPLE)


def header_4tib(run, work, base):
    path = newest(run) / "ema.safetensors"
    header = json.dumps({"0.0500/w": {"dtype": "U8", "shape": [2**42], "data_offsets": [0, 2**42]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**42)  # sparse: 4 TiB claimed, nothing on disk
    return scm("sample", "--ckpt", run, "--out", work / "x.png", *SAMPLE)


def consistency_teacher(run, work, base):
    r = scm("train", "--preset", "tiny-28-scd", "--data", base["data"], "--out", work / "scd", "--teacher",
            base["sct"], "--kimg", "0.004", "--batch", "4", "progress=false", "sample_every_kimg=0")
    return {**r, "output": "an sCD student trained on a consistency model's F" if r["rc"] == 0 else None}


def killed_then_resume(run, work, base):
    command = [sys.executable, "-m", "scm", "train", "--preset", "tiny-28-diffusion", "--data", str(base["data"]),
               "--out", str(work / "new"), *TRAIN]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = scm(*command[3:], "--resume")
    return {**r, "good": "the run trained to its end" if r["rc"] == 0 else None}


def export_under_a_file(run, work, base):
    (work / "a-file").write_text("")
    return scm("export", base["sct"], work / "a-file" / "out")


def sweep_n0(run, work, base):
    r = scm("ema", "sweep", base["sct"], "--ref", base["data"], "--n", "0", "--out", work / "sweep")
    left = (work / "sweep").exists()
    return {**r, "output": "an empty --out folder left" if left else None, "good": None if left else "no folder left"}


CASES = {
    "a flipped bit in the EMA weights, then scm sample": bit_flip,
    "4 KiB of NaN in the EMA weights, then scm sample": nan_4k,
    "the EMA file cut short, then scm sample": truncated,
    "NaN in the newest checkpoint, then --resume": resume_after_nan,
    "checkpoints/latest leading into another directory": latest_outside,
    "config.json with twice the channels of its weights": config_mismatch,
    "a safetensors header claiming 4 TiB (sparse file)": header_4tib,
    "an sCT run given to sCD as --teacher": consistency_teacher,
    "killed 0.5 s after start, then the same command with --resume": killed_then_resume,
    "scm export into a path under a file": export_under_a_file,
    "scm ema sweep --n 0": sweep_n0,
}


def prepare(root: Path) -> dict:
    from PIL import Image  # noqa: F401  (the sample check needs it: fail early)

    rng = np.random.default_rng(0)
    images = (rng.random((32, 28, 28)) > 0.7).astype(np.uint8) * 255
    np.savez(root / "data.npz", x=images, y=rng.integers(0, 2, 32))
    for name, preset in (("run", "tiny-28-diffusion"), ("sct", "tiny-28-sct")):
        r = scm("train", "--preset", preset, "--data", root / "data.npz", "--out", root / name, *TRAIN)
        assert r["rc"] == 0, r
    r = scm("sample", "--ckpt", root / "run", "--out", root / "base.png", *SAMPLE)
    assert r["rc"] == 0, r
    return {"data": root / "data.npz", "sct": root / "sct", "pixels": png_pixels(root / "base.png")}


def run_cases(out: Path, label: str) -> Path:
    root = out / label
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = prepare(root)
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        work = root / f"case{i}"
        work.mkdir()
        shutil.copytree(root / "run", work / "run")
        results[name] = case(work / "run", work, base)
        print(f"{name}: {results[name]}", file=sys.stderr)
    path = out / f"{label}.json"
    path.write_text(json.dumps({"label": label, "python": sys.version.split()[0], "cases": results}, indent=2))
    return path


def outcome(r: dict) -> str:
    def short(text: str) -> str:  # paths relative to the case's folder
        return re.sub(r"\S*/(before|after)/(case\d+/)?", "", text)

    good = f" ({short(r['good'])[:300]})" if r.get("good") else ""
    if r["rc"] == 0:
        return "exit 0" + (f", **{r['output']}**" if r.get("output") else "") + good
    kind = "traceback" if r["traceback"] else "named error"
    return f"exit {r['rc']}, {kind}: `{short(r['message'].removeprefix('error: '))[:150]}`{good}"


def table(before: Path, after: Path) -> str:
    a, b = json.loads(before.read_text())["cases"], json.loads(after.read_text())["cases"]
    lines = ["| fault | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {outcome(a[name])} | {outcome(b[name])} |" for name in b if name in a]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--label", default="after")
    ap.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.table:
        print(table(*args.table), end="")
    else:
        print(run_cases(args.out, args.label))


if __name__ == "__main__":
    main()
