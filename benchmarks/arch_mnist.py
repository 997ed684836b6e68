"""End to end on MNIST, transformer vs U-Net: a diffusion teacher and an sCD student for each architecture, at
the same wall-clock budget on this machine, scored by FD-MNIST and the share of confidently classified samples;
with --text, their text-conditioned variants on captioned MNIST, scored also by prompt adherence.

    python benchmarks/arch_mnist.py [--teacher-minutes 12] [--student-minutes 5] [--n 1000] [--arch dit-tiny]
    python benchmarks/arch_mnist.py --text [--guidance 2] …   # dit-tiny-text vs tiny-text (cross-attention)

For each network preset: `<family>-28-diffusion` trained for --teacher-minutes, then `<family>-28-scd` distilled
from it for --student-minutes (both stop on their time limit, with a checkpoint), then the teacher's Heun
sampler at 35 evaluations and the student's 1 and 2 steps, n samples each. Runs live in benchmarks/runs/arch-mnist/;
results go to benchmarks/results/arch_mnist.{json,md} with sample grids in benchmarks/results/arch_mnist/.
Text (`--text`): the teachers train on the text demo's prepared set (the built-in encoder's prompt embeddings of
`mnist-captions`), the students distil the teacher at a fixed guidance scale (`loss.guidance=G,G`, as `make
demo-text`), and every model is sampled at that guidance on the held-out prompts (the captions of MNIST's test
digits) and scored against the test split, with digit accuracy and attribute agreement; results in
arch_text.{json,md}, runs in benchmarks/runs/arch-text/.
Run it alone: a second process on the same cores changes every budget's worth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, write_results

from scm.app.demo_text import captioned_mnist
from scm.app.report import Report, inline_image
from scm.config import make_config
from scm.data import load_dataset
from scm.data.builtin import data_dir, fetch_mnist
from scm.evaluate import evaluate_setting
from scm.generate import Sampler
from scm.metrics import open_reference
from scm.runs import load_run
from scm.train import train

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"dit-tiny": "dit-tiny-28", "tiny": "tiny-28"}
TEXT_FAMILIES = {"dit-tiny-text": "dit-tiny-text-28", "tiny-text": "tiny-text-28"}


def log(msg: str) -> None:
    print(f"[arch_mnist] {msg}", file=sys.stderr, flush=True)


def run_training(out: Path, preset: str, minutes: float, data: str = "mnist", overrides: tuple = (), **flags) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cfg = make_config(preset, None, ["progress=false", "tensorboard=false", "sample_every_kimg=None", "log_every=10",
                                     f"max_minutes={minutes}", *overrides], data=data, out=str(out), kimg=100_000.0,
                      **flags)
    t0 = time.perf_counter()
    result = train(cfg)
    return {"preset": preset, "minutes": round((time.perf_counter() - t0) / 60, 2), "kimg": round(result.kimg, 2),
            "steps": result.step, "batch": cfg.batch, "parameters": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=[*FAMILIES, *TEXT_FAMILIES],
                    help="network presets (default: both of the mode)")
    ap.add_argument("--text", action="store_true", help="the text-conditioned networks on captioned MNIST")
    ap.add_argument("--guidance", type=float, default=2.0, help="--text: the teacher's CFG scale the students learn")
    ap.add_argument("--teacher-minutes", type=float, default=12.0)
    ap.add_argument("--student-minutes", type=float, default=5.0)
    ap.add_argument("--n", type=int, default=1000, help="samples per score")
    args = ap.parse_args()
    families = TEXT_FAMILIES if args.text else FAMILIES
    archs = args.arch or list(families)
    if any(a not in families for a in archs):
        ap.error(f"--arch must be one of {', '.join(families)}{' with' if args.text else ' without'} --text")
    if not (data_dir() / "mnist" / "mnist.npz").is_file():
        fetch_mnist(log=log)
    name = "arch_text" if args.text else "arch_mnist"
    space, ref = open_reference("mnist:test" if args.text else "mnist", log=log)
    work, assets = ROOT / "benchmarks" / "runs" / name.replace("_", "-"), RESULTS / name
    assets.mkdir(parents=True, exist_ok=True)
    data, scd, scoring = "mnist", (), {}
    if args.text:
        data = str(captioned_mnist(data_dir() / "mnist-captions-builtin"))
        scd = (f"loss.guidance={args.guidance},{args.guidance}",)
        prompts = load_dataset("mnist-captions:test").caption_of(torch.arange(args.n))
        scoring = {"guidance": args.guidance, "prompts": prompts}

    results = {}
    for arch in archs:
        family = families[arch]
        log(f"{arch}: teacher for {args.teacher_minutes} min")
        teacher = run_training(work / f"{arch}-teacher", f"{family}-diffusion", args.teacher_minutes, data)
        log(f"{arch}: sCD student for {args.student_minutes} min")
        student = run_training(work / f"{arch}-scd", f"{family}-scd", args.student_minutes, data, scd,
                               teacher=str(work / f"{arch}-teacher"))
        rows = []
        for role, sampler in (("teacher", Sampler(nfe=35, solver="heun")), ("scd", Sampler(steps=1)),
                              ("scd", Sampler(steps=2))):
            run = load_run(work / f"{arch}-{role}")
            tag = f"{arch}-{role}-nfe{sampler.evaluations(run)}"
            row, _ = evaluate_setting(run, sampler, space, ref, args.n, batch=250, grid_path=assets / f"{tag}.png",
                                      **scoring)
            row["grid"] = f"{name}/{tag}.png"
            row["role"] = role
            log(f"{tag}: {space.metric} {row[space.metric]:.1f}, {100 * row.get('confident', 0):.0f} % confident"
                + (f", attributes {100 * row['attributes']:.0f} %" if args.text else ""))
            rows.append(row)
        teacher["parameters"] = student["parameters"] = load_run(work / f"{arch}-teacher").net.num_parameters()
        results[arch] = {"teacher": teacher, "scd": student, "rows": rows}

    write_report(name, args, space.metric, results)


def write_report(name: str, args, metric: str, results: dict) -> None:
    what = "text-conditioned networks on captioned MNIST" if args.text else "MNIST"
    report = Report(f"Transformer vs U-Net, {what}: teacher and 2-step sCD at the same CPU budget")
    report.text(f"Each architecture: a diffusion teacher trained {args.teacher_minutes:g} min, an sCD student "
                f"distilled from it {args.student_minutes:g} min (both on this machine, alone), n = {args.n} samples "
                f"per score ({metric} against the MNIST {'test' if args.text else 'training'} set; lower is better; "
                "'confident' = share of samples an MNIST classifier labels with probability ≥ 0.9)."
                + (f" Text: every model sampled at guidance {args.guidance:g} (the students learned the teacher at "
                   "that scale) on the held-out prompts; digit accuracy and attribute agreement (size, thickness, "
                   "slant recomputed on the images) against each prompt." if args.text else ""))
    extra = ["digit accuracy", "attributes"] if args.text else []
    table = []
    for arch, r in results.items():
        for row in r["rows"]:
            train_info = r[row["role"]]
            adherence = [f"{100 * row['digit_accuracy']:.1f} %", f"{100 * row['attributes']:.1f} %"] if extra else []
            table.append([arch, f"{train_info['parameters'] / 1e6:.2f}M", row["sampler"], str(row["nfe"]),
                          f"{train_info['kimg']:.1f} kimg / {train_info['minutes']:.1f} min",
                          f"{row[metric]:.1f}", f"{100 * row.get('confident', 0):.0f} %", *adherence,
                          f"{1000 * row['seconds_per_image']:.1f}", inline_image(row["grid"], 96)])
    report.table(["network", "params", "sampler", "NFE", "trained", metric, "confident", *extra, "ms/image",
                  "samples"], table)
    write_results(name, {"args": vars(args), "metric": metric, "results": results}, report)
    log(json.dumps({a: [round(r[metric], 1) for r in v["rows"]] for a, v in results.items()}))

if __name__ == "__main__":
    main()
