"""Text to image on captioned MNIST: a text teacher vs its sCD student on held-out prompts, with seed intervals.

    python benchmarks/text_fidelity.py --teacher demo/text-teacher --student [LABEL=]RUN [[LABEL=]RUN …] \
        [--n 500] [--seeds 0 1 2] [--guidance 2] [--teacher-nfe 35] [--t-mid 1.1 1.3] [--name text-fidelity]

Prompts: the first captions of MNIST's first n test digits (held out: both models trained on the training digits'
captions). Per sampler setting and sample seed: FD-MNIST (against the test digits), digit accuracy and attribute
agreement (`scm.evaluate.prompt_adherence`); the table gives the mean and 95 % t-interval over seeds, and the
student's figures as a ratio (FD) or a difference in points (accuracy, agreement) to the teacher's, per seed then
averaged. The student's 2 steps pass through its run's intermediate time t_mid, or through each of --t-mid (a row
each). Writes benchmarks/results/NAME.{json,md} (NAME: --name, text-fidelity by default).

A diagnostic table follows: the share of faint pixels (intensities between 2 % and 10 %: haze, not strokes) and the
size and attribute agreement measured again with the pixels below 10 % set to background. Size is the ink's
RMS extent weighted by intensity (`scm.data.captions`), so faint haze far from the digit's centre reads as a larger
digit. The script measures how much that cleaning changes the size words of MNIST's test digits (the captions'
measure): where it hardly does, the second figure separates the digit's size from the haze around it. It is a
diagnosis, not the evidence's measure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import write_results

from scm.app.report import Report
from scm.data import load_dataset
from scm.data.captions import mnist_attributes
from scm.evaluate import evaluate_setting, prompt_adherence
from scm.generate import Sampler
from scm.metrics import open_reference
from scm.metrics.intervals import seed_interval
from scm.runs import RunDir, load_run

FIGURES = ("FD-MNIST", "digit_accuracy", "attributes")
DIAGNOSTICS = ("faint_pixels", "size_agreement", "size_without_faint", "attributes_without_faint")
FAINT = (0.02, 0.10)  # intensities (0 background, 1 ink) counted as faint haze


def cleaned(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(intensities in [0, 1], the images in [-1, 1] with the pixels below FAINT[1] set to background)."""
    intensity = ((images.float() + 1) / 2).clamp(0, 1)
    return intensity, torch.where(intensity < FAINT[1], 0.0, intensity) * 2 - 1


def faint_share(intensity: torch.Tensor) -> float:
    return ((intensity > FAINT[0]) & (intensity < FAINT[1])).float().mean().item()


def real_digits_reference() -> dict:
    """On MNIST's test digits: the share of faint pixels, and the share of size words the cleaning leaves as they
    were (the words measured as the captions are)."""
    test = load_dataset("mnist:test")
    images, digits = test.to_model(torch.as_tensor(test.images)), torch.as_tensor(test.labels)
    intensity, clean = cleaned(images)
    before, after = mnist_attributes(images, digits), mnist_attributes(clean, digits)
    return {"faint_pixels": faint_share(intensity),
            "size_words_unchanged": float((before["size_word"] == after["size_word"]).mean())}


def haze_diagnostics(images: torch.Tensor, prompts: list[str], space) -> dict:
    """The share of faint pixels, and size and attribute agreement with the pixels below FAINT[1] set to
    background (the module docstring says why)."""
    intensity, clean = cleaned(images)
    again = prompt_adherence([prompts[i % len(prompts)] for i in range(len(images))], clean, space)
    return {"faint_pixels": faint_share(intensity), "size_without_faint": again["size_agreement"],
            "attributes_without_faint": again["attributes"]}


def students(specs: list[str]) -> list[tuple[str, Path]]:
    """--student entries: LABEL=PATH, or PATH (labelled by its objective: sCD, or sCD + VSD)."""
    return [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) if "=" in spec else (objective(Path(spec)), Path(spec))
            for spec in specs]


def objective(path: Path) -> str:
    loss = json.loads(RunDir(path).config_path.read_text())["loss"]
    return "sCD + VSD" if loss.get("vsd_weight") else "sCD"


def trained_kimg(run) -> str:
    """The run's kimg, after those of the runs it was initialized from (a VSD fine-tune of an sCD student: 20 + 3.2);
    a teacher it was initialized from (sCD's default) is not counted."""
    own = round(run.step * run.cfg.batch / 1000, 1)
    init = run.cfg.init
    if init is None or init == run.cfg.teacher or run.cfg.method != "scd":
        return f"{own:g}"
    return f"{trained_kimg(load_run(init))} + {own:g}"


def measure(args) -> dict:
    space, ref = open_reference("mnist:test")
    prompts = load_dataset("mnist-captions:test").caption_of(torch.arange(args.n))
    settings = {"teacher": (args.teacher, Sampler(nfe=args.teacher_nfe, solver="heun"))}
    for label, student in students(args.student):
        settings[f"{label} 1 step"] = (student, Sampler(steps=1))
        for t_mid in args.t_mid or [None]:
            at = "" if t_mid is None else f", t_mid {t_mid:g}"
            settings[f"{label} 2 steps{at}"] = (student, Sampler(steps=2, t_mid=t_mid))
    rows = {}
    for name, (path, sampler) in settings.items():
        run = load_run(path)
        per_seed = []
        for seed in args.seeds:
            row, images = evaluate_setting(run, sampler, space, ref, args.n, seed=seed, guidance=args.guidance,
                                           prompts=prompts)
            per_seed.append({k: row[k] for k in (*FIGURES, "size_agreement", "seconds_per_image", "nfe")}
                            | haze_diagnostics(images, prompts, space))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {row[k]:.4g}" for k in FIGURES), flush=True)
        rows[name] = {"run": str(path), "kimg": trained_kimg(run), "per_seed": per_seed}
    return rows


def summarise(rows: dict) -> dict:
    teacher = rows["teacher"]["per_seed"]
    for row in rows.values():
        seeds = row["per_seed"]
        row["interval"] = {k: seed_interval([s[k] for s in seeds]).__dict__ for k in (*FIGURES, *DIAGNOSTICS)}
        row["vs_teacher"] = {
            "FD-MNIST ratio": seed_interval([s["FD-MNIST"] / t["FD-MNIST"] for s, t in zip(seeds, teacher,
                                                                                           strict=True)]).__dict__,
            **{f"{k} points": seed_interval([100 * (s[k] - t[k]) for s, t in zip(seeds, teacher, strict=True)]).__dict__
               for k in (*FIGURES[1:], *DIAGNOSTICS[1:])}}
    return rows


def report(rows: dict, real: dict, args) -> Report:
    def show(iv, scale=1.0, fmt="{:.1f}"):
        text = fmt.format(scale * iv["mean"])
        if iv["low"] is None:
            return text
        return f"{text} [{fmt.format(scale * iv['low'])}, {fmt.format(scale * iv['high'])}]"

    r = Report(f"Text to image on captioned MNIST: teacher vs student (n = {args.n}, seeds {args.seeds}, "
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
    r.heading("Diagnosis: faint haze and the size measure", 3).text(
        f"Faint pixels: the share with intensities between {100 * FAINT[0]:g} % and {100 * FAINT[1]:g} % "
        f"(MNIST's test digits: {100 * real['faint_pixels']:.2f} %). The agreements are measured again with the "
        f"pixels below {100 * FAINT[1]:g} % set to background, which on MNIST's test digits leaves "
        f"{100 * real['size_words_unchanged']:.1f} % of the size words unchanged: size is the intensity-weighted "
        "extent of the ink, so haze around a digit reads as size. A diagnosis, not the measure of the table above.")
    r.table(["model", "faint pixels %", "size agreement %", "size, faint removed %", "size − teacher (pts)",
             "size, faint removed − teacher (pts)", "attributes, faint removed %",
             "attributes, faint removed − teacher (pts)"],
            [[name, show(row["interval"]["faint_pixels"], 100, "{:.2f}"), show(row["interval"]["size_agreement"], 100),
              show(row["interval"]["size_without_faint"], 100), show(row["vs_teacher"]["size_agreement points"]),
              show(row["vs_teacher"]["size_without_faint points"]),
              show(row["interval"]["attributes_without_faint"], 100),
              show(row["vs_teacher"]["attributes_without_faint points"])]
             for name, row in rows.items()])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=Path("demo/text-teacher"))
    ap.add_argument("--student", nargs="+", default=["runs/demo-text/runs/scd"], metavar="[LABEL=]RUN",
                    help="students, each labelled (default label: its objective, sCD or sCD + VSD)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--teacher-nfe", type=int, default=35)
    ap.add_argument("--t-mid", type=float, nargs="+", help="the student's 2-step t_mid (default: its run's)")
    ap.add_argument("--name", default="text-fidelity", help="the results' file name")
    args = ap.parse_args()
    rows, real = summarise(measure(args)), real_digits_reference()
    rep = report(rows, real, args)
    print(rep.to_markdown())
    payload = {"n": args.n, "seeds": args.seeds, "guidance": args.guidance, "t_mid": args.t_mid, "rows": rows,
               "mnist_test_digits": real}
    json_path, md_path = write_results(args.name, json.loads(json.dumps(payload)), rep)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
