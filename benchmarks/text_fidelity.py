"""Text to image on captioned MNIST: a text teacher vs its sCD student on held-out prompts, with seed intervals.

    python benchmarks/text_fidelity.py --teacher demo/text-teacher --student runs/demo-text/runs/scd \
        [--n 500] [--seeds 0 1 2] [--guidance 2] [--teacher-nfe 35] [--t-mid 1.1 1.3] [--name text-fidelity]

Prompts: the first captions of MNIST's first n test digits (held out: both models trained on the training digits'
captions). Per sampler setting and sample seed: FD-MNIST (against the test digits), digit accuracy and attribute
agreement (`scm.evaluate.prompt_adherence`); the table gives the mean and 95 % t-interval over seeds, and the
student's figures as a ratio (FD) or a difference in points (accuracy, agreement) to the teacher's, per seed then
averaged. The student's 2 steps pass through its run's intermediate time t_mid, or through each of --t-mid (a row
each). Writes benchmarks/results/NAME.{json,md} (NAME: --name, text-fidelity by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import write_results

from scm.app.report import Report
from scm.data import load_dataset
from scm.evaluate import evaluate_setting
from scm.generate import Sampler
from scm.metrics import open_reference
from scm.metrics.intervals import seed_interval
from scm.runs import load_run

FIGURES = ("FD-MNIST", "digit_accuracy", "attributes")


def measure(args) -> dict:
    space, ref = open_reference("mnist:test")
    prompts = load_dataset("mnist-captions:test").caption_of(torch.arange(args.n))
    settings = {"teacher": (args.teacher, Sampler(nfe=args.teacher_nfe, solver="heun")),
                "sCD 1 step": (args.student, Sampler(steps=1))}
    for t_mid in args.t_mid or [None]:
        at = "" if t_mid is None else f", t_mid {t_mid:g}"
        settings[f"sCD 2 steps{at}"] = (args.student, Sampler(steps=2, t_mid=t_mid))
    rows = {}
    for name, (path, sampler) in settings.items():
        run = load_run(path)
        per_seed = []
        for seed in args.seeds:
            row, _ = evaluate_setting(run, sampler, space, ref, args.n, seed=seed, guidance=args.guidance,
                                      prompts=prompts)
            per_seed.append({k: row[k] for k in (*FIGURES, "seconds_per_image", "nfe")})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {row[k]:.4g}" for k in FIGURES), flush=True)
        rows[name] = {"run": str(path), "kimg": round(load_run(path).step * run.cfg.batch / 1000, 1),
                      "per_seed": per_seed}
    return rows


def summarise(rows: dict) -> dict:
    teacher = rows["teacher"]["per_seed"]
    for row in rows.values():
        seeds = row["per_seed"]
        row["interval"] = {k: seed_interval([s[k] for s in seeds]).__dict__ for k in FIGURES}
        row["vs_teacher"] = {
            "FD-MNIST ratio": seed_interval([s["FD-MNIST"] / t["FD-MNIST"] for s, t in zip(seeds, teacher,
                                                                                           strict=True)]).__dict__,
            **{f"{k} points": seed_interval([100 * (s[k] - t[k]) for s, t in zip(seeds, teacher, strict=True)]).__dict__
               for k in FIGURES[1:]}}
    return rows


def report(rows: dict, args) -> Report:
    def show(iv, scale=1.0, fmt="{:.1f}"):
        text = fmt.format(scale * iv["mean"])
        if iv["low"] is None:
            return text
        return f"{text} [{fmt.format(scale * iv['low'])}, {fmt.format(scale * iv['high'])}]"

    r = Report(f"Text to image on captioned MNIST: teacher vs sCD student (n = {args.n}, seeds {args.seeds}, "
               f"guidance {args.guidance:g})")
    r.text("Mean and 95 % t-interval over sample seeds; the last columns compare the student with the teacher seed "
           "by seed (FD ratio; differences in percentage points).")
    r.table(["model", "NFE", "trained kimg", "FD-MNIST", "digit accuracy %", "attribute agreement %", "FD ÷ teacher",
             "accuracy − teacher (pts)", "attributes − teacher (pts)"],
            [[name, row["per_seed"][0]["nfe"], row["kimg"], show(row["interval"]["FD-MNIST"]),
              show(row["interval"]["digit_accuracy"], 100), show(row["interval"]["attributes"], 100),
              show(row["vs_teacher"]["FD-MNIST ratio"], fmt="{:.2f}"),
              show(row["vs_teacher"]["digit_accuracy points"]), show(row["vs_teacher"]["attributes points"])]
             for name, row in rows.items()])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=Path("demo/text-teacher"))
    ap.add_argument("--student", type=Path, default=Path("runs/demo-text/runs/scd"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--teacher-nfe", type=int, default=35)
    ap.add_argument("--t-mid", type=float, nargs="+", help="the student's 2-step t_mid (default: its run's)")
    ap.add_argument("--name", default="text-fidelity", help="the results' file name")
    args = ap.parse_args()
    rows = summarise(measure(args))
    rep = report(rows, args)
    print(rep.to_markdown())
    payload = {"n": args.n, "seeds": args.seeds, "guidance": args.guidance, "t_mid": args.t_mid, "rows": rows}
    json_path, md_path = write_results(args.name, json.loads(json.dumps(payload)), rep)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
