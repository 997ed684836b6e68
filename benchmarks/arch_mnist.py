"""End to end on MNIST, transformer vs U-Net: a diffusion teacher and an sCD student for each architecture, at
the same wall-clock budget on this machine, scored by FD-MNIST and the share of confidently classified samples.

    python benchmarks/arch_mnist.py [--teacher-minutes 12] [--student-minutes 5] [--n 1000] [--arch dit-tiny]

For each network preset: `<family>-28-diffusion` trained for --teacher-minutes, then `<family>-28-scd` distilled
from it for --student-minutes (both stop on their time limit, with a checkpoint), then the teacher's Heun
sampler at 35 evaluations and the student's 1 and 2 steps, n samples each. Runs live in benchmarks/runs/arch-mnist/;
results go to benchmarks/results/arch_mnist.{json,md} with sample grids in benchmarks/results/arch_mnist/.
Run it alone: a second process on the same cores changes every budget's worth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import RESULTS, write_results

from scm.app.report import Report, inline_image
from scm.config import make_config
from scm.data.builtin import data_dir, fetch_mnist
from scm.evaluate import evaluate_setting
from scm.generate import Sampler
from scm.metrics import open_reference
from scm.runs import load_run
from scm.train import train

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"dit-tiny": "dit-tiny-28", "tiny": "tiny-28"}


def log(msg: str) -> None:
    print(f"[arch_mnist] {msg}", file=sys.stderr, flush=True)


def run_training(out: Path, preset: str, minutes: float, **flags) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cfg = make_config(preset, None, ["progress=false", "tensorboard=false", "sample_every_kimg=None", "log_every=10",
                                     f"max_minutes={minutes}"], data="mnist", out=str(out), kimg=100_000.0, **flags)
    t0 = time.perf_counter()
    result = train(cfg)
    return {"preset": preset, "minutes": round((time.perf_counter() - t0) / 60, 2), "kimg": round(result.kimg, 2),
            "steps": result.step, "batch": cfg.batch, "parameters": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=list(FAMILIES), help="network presets (default: both)")
    ap.add_argument("--teacher-minutes", type=float, default=12.0)
    ap.add_argument("--student-minutes", type=float, default=5.0)
    ap.add_argument("--n", type=int, default=1000, help="samples per score")
    args = ap.parse_args()
    archs = args.arch or list(FAMILIES)
    if not (data_dir() / "mnist" / "mnist.npz").is_file():
        fetch_mnist(log=log)
    space, ref = open_reference("mnist", log=log)
    work, assets = ROOT / "benchmarks" / "runs" / "arch-mnist", RESULTS / "arch_mnist"
    assets.mkdir(parents=True, exist_ok=True)

    results = {}
    for arch in archs:
        family = FAMILIES[arch]
        log(f"{arch}: teacher for {args.teacher_minutes} min")
        teacher = run_training(work / f"{arch}-teacher", f"{family}-diffusion", args.teacher_minutes)
        log(f"{arch}: sCD student for {args.student_minutes} min")
        student = run_training(work / f"{arch}-scd", f"{family}-scd", args.student_minutes,
                               teacher=str(work / f"{arch}-teacher"))
        rows = []
        for role, sampler in (("teacher", Sampler(nfe=35, solver="heun")), ("scd", Sampler(steps=1)),
                              ("scd", Sampler(steps=2))):
            run = load_run(work / f"{arch}-{role}")
            tag = f"{arch}-{role}-nfe{sampler.evaluations(run)}"
            row, _ = evaluate_setting(run, sampler, space, ref, args.n, batch=250, grid_path=assets / f"{tag}.png")
            row["grid"] = f"arch_mnist/{tag}.png"
            row["role"] = role
            log(f"{tag}: {space.metric} {row[space.metric]:.1f}, {100 * row.get('confident', 0):.0f} % confident")
            rows.append(row)
        teacher["parameters"] = student["parameters"] = load_run(work / f"{arch}-teacher").net.num_parameters()
        results[arch] = {"teacher": teacher, "scd": student, "rows": rows}

    metric = space.metric
    report = Report("Transformer vs U-Net on MNIST: teacher and 2-step sCD at the same CPU budget")
    report.text(f"Each architecture: a diffusion teacher trained {args.teacher_minutes:g} min, an sCD student "
                f"distilled from it {args.student_minutes:g} min (both on this machine, alone), n = {args.n} samples "
                f"per score ({metric} against the MNIST training set; lower is better; 'confident' = share of "
                "samples an MNIST classifier labels with probability ≥ 0.9).")
    table = []
    for arch, r in results.items():
        for row in r["rows"]:
            train_info = r[row["role"]]
            table.append([arch, f"{train_info['parameters'] / 1e6:.2f}M", row["sampler"], str(row["nfe"]),
                          f"{train_info['kimg']:.1f} kimg / {train_info['minutes']:.1f} min",
                          f"{row[metric]:.1f}", f"{100 * row.get('confident', 0):.0f} %",
                          f"{1000 * row['seconds_per_image']:.1f}", inline_image(row["grid"], 96)])
    report.table(["network", "params", "sampler", "NFE", "trained", metric, "confident", "ms/image", "samples"], table)
    write_results("arch_mnist", {"args": vars(args), "metric": metric, "results": results}, report)
    log(json.dumps({a: [round(r[metric], 1) for r in v["rows"]] for a, v in results.items()}))


if __name__ == "__main__":
    main()
