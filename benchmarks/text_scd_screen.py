"""Screen sCD settings of the text DiT on captioned MNIST: distil the committed text teacher to a fixed number of
images with some settings changed, then measure the student's attribute agreement, digit accuracy and FD-MNIST on
held-out prompts (n = 500, sample seeds 0 and 1) against the teacher's at guidance 2 (a student trained on a range
of guidance scales, as in §5.2, can be sampled at others: --student-guidance), and the tangent norm |g| after the
warm-up and at the end of training (its growth is the first sign of the instability in §4 of the paper).

    python benchmarks/text_scd_screen.py NAME KIMG [key=value …]   # e.g. b32 26 batch=32
    python benchmarks/text_scd_screen.py NAME KIMG [key=value …] --eval-only   # measure a run again
    python benchmarks/text_scd_screen.py NAME KIMG loss.guidance=1,3 --student-guidance 2 2.5 3   # a guidance range
    python benchmarks/text_scd_screen.py NAME 3.2 init=benchmarks/runs/t2i/BASE loss.vsd_weight=0.5 \
        optim.critic_lr_scale=5 loss.warmup_kimg=0 optim.lr=1.3e-4 optim.lr_decay_kimg=None   # sCD + VSD from BASE
    python benchmarks/text_scd_screen.py                          # the teacher's figures (guidance 2 and 1)
    python benchmarks/text_scd_screen.py --report                 # the table of every screened setting

Runs go to benchmarks/runs/t2i/NAME; results to benchmarks/results/text-scd-screen/NAME.json and the table to
benchmarks/results/text-scd-screen.md. A screen, not evidence: two seeds, one training seed; the settings it
picks are then measured with three seeds by text_fidelity.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import RESULTS, write_results

from scm.app.demo_text import captioned_mnist
from scm.app.report import Report
from scm.config import make_config
from scm.data import load_dataset
from scm.data.builtin import data_dir
from scm.evaluate import evaluate_setting
from scm.generate import Sampler
from scm.metrics import open_reference
from scm.runs import load_run
from scm.sampling import T_MID
from scm.train import train

RUNS, OUT = Path(__file__).resolve().parent / "runs" / "t2i", RESULTS / "text-scd-screen"
TEACHER, SEEDS, N, GUIDANCE = "demo/text-teacher", (0, 1), 500, 2.0
ATTRIBUTES = ("size", "thickness", "slant")


def distil(name: str, kimg: float, overrides: list[str], eval_only: bool = False) -> tuple[Path, dict]:
    settings = dict(o.split("=", 1) for o in overrides)
    batch = int(settings.pop("batch", 64))
    out = RUNS / name
    if not eval_only:
        train(make_config("dit-tiny-text-28-scd", None, [
            "tensorboard=false", "max_minutes=60", "sample_every_kimg=None", "ckpt_every_kimg=1000", "log_every=5",
            f"loss.guidance={GUIDANCE},{GUIDANCE}", *(f"{k}={v}" for k, v in settings.items())],
            data=str(captioned_mnist(data_dir() / "mnist-captions-builtin")), out=str(out), kimg=kimg, batch=batch,
            teacher=TEACHER))
    return out, {"batch": batch, **training_stats(out)}


def training_stats(run: Path) -> dict:
    """The kimg reached, the minutes it took, and the mean tangent norm |g| after the tangent warm-up (kimg 2–4)
    and over the last 2 kimg."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    end = rows[-1]["kimg"]
    mean_g = lambda lo, hi: round(statistics.mean(  # noqa: E731
        r["g_norm"] for r in rows if lo <= r["kimg"] <= hi and r.get("g_norm") is not None), 2)
    return {"kimg": round(end, 1), "minutes": round(rows[-1]["time"] / 60, 1), "g_norm_early": mean_g(2, 4),
            "g_norm_end": mean_g(end - 2, end)}


def score(run, sampler: Sampler, space, ref, prompts, guidance: float = GUIDANCE) -> dict:
    rows = [evaluate_setting(run, sampler, space, ref, N, seed=s, guidance=guidance, prompts=prompts)[0]
            for s in SEEDS]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"FD-MNIST": mean("FD-MNIST"), "digit_accuracy": mean("digit_accuracy"), "attributes": mean("attributes"),
            **{a: mean(f"{a}_agreement") for a in ATTRIBUTES}}


def screen(args) -> None:
    space, ref = open_reference("mnist:test")
    prompts = load_dataset("mnist-captions:test").caption_of(torch.arange(N))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, guidance in (("teacher", GUIDANCE), ("teacher-unguided", 1.0)):
        if not (OUT / f"{name}.json").is_file():
            row = score(load_run(TEACHER), Sampler(nfe=35), space, ref, prompts, guidance)
            (OUT / f"{name}.json").write_text(json.dumps(row))
    if args.name is None:
        return
    out, training = distil(args.name, args.kimg, args.overrides, args.eval_only)
    rows = {}
    for ema, kw in (("EMA 0.05", {}), ("EMA 0.1", {"ema_std": 0.1}), ("raw", {"raw": True})):
        run = load_run(out, **kw)
        for steps in (1, 2):
            for s in args.student_guidance:
                at = "" if s == GUIDANCE else f", s {s:g}"
                rows[f"{ema}, {steps} step{at}"] = score(run, Sampler(steps=steps), space, ref, prompts, s)
    (OUT / f"{args.name}.json").write_text(json.dumps(
        {"name": args.name, "overrides": args.overrides, "training": training, "t_mid": run.cfg.t_mid,
         "rows": rows}, indent=1))


def report() -> None:
    teacher = json.loads((OUT / "teacher.json").read_text())
    unguided = json.loads((OUT / "teacher-unguided.json").read_text())
    screened = sorted((json.loads(p.read_text()) for p in OUT.glob("*.json") if not p.name.startswith("teacher")),
                      key=lambda s: (len(s["overrides"]), s["training"]["kimg"], " ".join(s["overrides"])))
    r = Report(f"sCD settings of the text DiT, screened (n = {N}, seeds {list(SEEDS)}, guidance {GUIDANCE:g})")

    def described(row):
        pct = lambda key: f"{100 * row[key]:.1f}"  # noqa: E731
        return (f"attribute agreement {pct('attributes')} % (size {pct('size')}, thickness {pct('thickness')}, slant "
                f"{pct('slant')}), digit accuracy {pct('digit_accuracy')} %, FD-MNIST {row['FD-MNIST']:.2f}")

    r.text(f"Teacher (Heun, 35 NFE): {described(teacher)}; without guidance (guidance 1): {described(unguided)}. "
           "Each student: the teacher distilled with the settings of the first column "
           "changed from lr 2e-4, P_mean −0.8, P_std 1.6, batch 64 (guidance 2, one training seed); |g|: the mean "
           "tangent norm after the tangent warm-up (kimg 2–4) and over the last 2 kimg; t_mid: the 2-step rows' "
           "intermediate time, the preset's when the setting was screened.")
    r.table(["setting", "kimg", "t_mid", "|g| start → end", "student", "attributes − teacher (pts)", "size",
             "thickness", "slant", "digit accuracy %", "FD-MNIST"],
            [[" ".join(s["overrides"]) or "(base)", s["training"]["kimg"], s.get("t_mid", T_MID),
              f"{s['training']['g_norm_early']} → {s['training']['g_norm_end']}", name,
              f"{100 * (row['attributes'] - teacher['attributes']):+.1f}",
              *(f"{100 * row[a]:.1f}" for a in ATTRIBUTES), f"{100 * row['digit_accuracy']:.1f}",
              f"{row['FD-MNIST']:.2f}"]
             for s in screened for name, row in s["rows"].items() if name.startswith(("EMA 0.05", "raw, 2"))])
    write_results("text-scd-screen", {"teacher": teacher, "screened": screened}, r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("kimg", nargs="?", type=float)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="measure NAME's run again without training it")
    ap.add_argument("--student-guidance", type=float, nargs="+", default=[GUIDANCE], metavar="S",
                    help="the guidance scales the student is sampled at (within its loss.guidance range)")
    args = ap.parse_args()
    if args.report:
        return report()
    if (args.name is None) != (args.kimg is None):
        ap.error("give NAME and KIMG (or neither: the teacher's figures only; or --report)")
    torch.set_num_threads(2)
    screen(args)


if __name__ == "__main__":
    main()
