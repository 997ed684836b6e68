"""`scm demo --text` (and `make demo-text`): text to image on captioned MNIST, from a fresh clone, on 2 CPU cores.

1. MNIST with generated captions (`mnist-captions`: the digit and its measured size, thickness and slant, in a few
   phrasings; `scm.data.captions`), encoded by the built-in toy text encoder into a prepared set (`scm data
   encode --text-encoder builtin`);
2. a text-conditioned diffusion teacher (the transformer with cross-attention, `dit-tiny-text`): the one this
   project trained with `scm train` (demo/text-teacher, committed with its command), or trained here with --full;
3. sCD distillation from it with classifier-free guidance as an input (§5.2), live, for a few minutes, ending in a
   short sCD + VSD phase (§6) inside the same run: a critic (a copy of the teacher) learns the student's samples'
   score, and the student moves along the critic's and the teacher's difference, which takes off the haze that the
   consistency objective alone leaves;
4. evaluation on held-out prompts (the captions of MNIST's test digits): FD-MNIST, digit accuracy and attribute
   agreement of the teacher (Heun ODE, guided) and the 1- and 2-step student, and a report with a prompt grid (one
   row per prompt, the teacher's and the student's images side by side, from the same noise).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scm.app.demo import _train
from scm.app.report import Report
from scm.data import load_dataset
from scm.data.builtin import data_dir, fetch_mnist
from scm.data.prepared import is_prepared
from scm.evaluate import evaluate_setting
from scm.files import atomic_write
from scm.generate import Sampler, generate
from scm.images import grid, save_png
from scm.metrics import open_reference
from scm.runs import load_run
from scm.sampling import TEACHER_NFE

__all__ = ["GRID_PROMPTS", "TextDemoBudget", "run_text_demo"]

# The prompt grid's rows: every digit, and the attributes' words.
GRID_PROMPTS = ("a zero", "a thin one", "a thick two", "three, slanted left", "a large four", "a small five",
                "six, thick and slanted right", "a thin upright seven", "an eight", "a large right-leaning nine")


@dataclass
class TextDemoBudget:
    """Minutes per stage, the student's distillation settings, evaluation size and guidance; `seconds()` gives the
    tiny budget the test suite uses."""

    teacher_minutes: float = 75.0     # --full only
    scd_kimg: float = 23.2            # 20 kimg sCD (1.93×), 3.2 sCD + VSD (4.71×): 19.7 % of the teacher's compute
    scd_minutes: float = 12.0         # a cap, for slower machines (about 8 minutes on 2 CPU cores)
    vsd_start_kimg: float = 20.0      # the VSD phase starts here, inside the sCD run (0: from the first step)
    vsd_weight: float = 0.5           # λ of the VSD term (1 broke the digits' shapes); 0 distils with sCD alone
    critic_lr_scale: float = 5.0      # the critic learns at 5× the student's rate (at 1× VSD harmed the student)
    scd_batch: int = 32               # twice batch 64's optimizer steps for the same images: better attributes
    scd_P_mean: float = -0.6          # a little more of the high noise levels than the preset's −0.8 (−0.4 collapsed)
    scd_lr_decay_kimg: float = 8.0    # lr ∝ 1/√(kimg/8) past 8 kimg (constant, seed 1 collapsed at 25 kimg)
    n_eval: int = 500
    teacher_nfe: int = TEACHER_NFE
    batch: int = 64
    guidance: float = 2.0             # the teacher's classifier-free guidance scale; the student takes it as input
    per_prompt: int = 6               # images per prompt in the grid

    @classmethod
    def seconds(cls) -> TextDemoBudget:
        return cls(teacher_minutes=0.1, scd_minutes=0.1, vsd_start_kimg=0.0, n_eval=40, teacher_nfe=3, batch=16,
                   scd_batch=16, per_prompt=2)

    def student_overrides(self) -> list[str]:
        """The sCD run's settings beyond the preset's (the VSD phase's only when vsd_weight > 0)."""
        g = self.guidance
        out = [f"loss.guidance={g},{g}", f"loss.P_mean={self.scd_P_mean}",
               f"optim.lr_decay_kimg={self.scd_lr_decay_kimg}"]
        if self.vsd_weight > 0:
            out += [f"loss.vsd_weight={self.vsd_weight}", f"loss.vsd_start_kimg={self.vsd_start_kimg}",
                    f"optim.critic_lr_scale={self.critic_lr_scale}"]
        return out

    @property
    def student_label(self) -> str:
        return "sCD + VSD" if self.vsd_weight > 0 else "sCD"


def _log(msg: str) -> None:
    print(f"[demo-text] {msg}", file=sys.stderr, flush=True)


def captioned_mnist(folder: Path) -> Path:
    """MNIST's training digits with their captions' prompt embeddings (built-in encoder), prepared once in `folder`."""
    from scm.data.prompts import encode_captions

    if is_prepared(folder):
        return folder
    return encode_captions("mnist-captions", "builtin", folder, progress=False, log=_log)


def run_text_demo(out: Path, budget: TextDemoBudget | None = None, full: bool = False,
                  teacher: Path | None = None) -> dict:
    budget = budget or TextDemoBudget()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t_start = t0 = time.perf_counter()

    def stage(name):
        nonlocal t0
        stages[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: {stages[name]:.0f} s")
        t0 = time.perf_counter()

    if not (data_dir() / "mnist" / "mnist.npz").is_file():
        fetch_mnist(log=_log)
    data = captioned_mnist(data_dir() / "mnist-captions-builtin")
    space, ref = open_reference("mnist:test", log=_log)
    stage("captioned data, classifier and reference statistics")
    if full:
        teacher, _ = _train("dit-tiny-text-28-diffusion", out / "runs" / "teacher", budget.teacher_minutes, budget,
                            data=str(data))
    stage("teacher")
    scd, scd_kimg = _train("dit-tiny-text-28-scd", out / "runs" / "scd", budget.scd_minutes, budget, data=str(data),
                           kimg=budget.scd_kimg, batch=budget.scd_batch, teacher=str(teacher),
                           overrides=budget.student_overrides())
    stage(f"{budget.student_label} distillation")
    prompts = load_dataset("mnist-captions:test").caption_of(torch.arange(budget.n_eval))
    rows = _evaluate(teacher, scd, space, ref, prompts, budget, out)
    stage("evaluation")
    _prompt_grid(teacher, scd, budget, out / "prompts.png")
    stage("prompt grid")
    result = {"metric": space.metric, "n_eval": budget.n_eval, "rows": rows,
              "trained_kimg": {budget.student_label: scd_kimg},
              "stages_seconds": stages, "total_seconds": round(time.perf_counter() - t_start, 1),
              "teacher": str(teacher), "budget": asdict(budget), "full": full, "grid_prompts": list(GRID_PROMPTS),
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()}}
    atomic_write(out / "results.json", json.dumps(result, indent=2) + "\n")
    _report(result).write(out / "report.md", out / "report.html")
    _log(f"done in {result['total_seconds'] / 60:.1f} min: {out / 'report.md'} and {out / 'report.html'}")
    return result


def _evaluate(teacher: Path, scd: Path, space, ref, prompts: list[str], budget: TextDemoBudget, out: Path) -> list:
    """The teacher (Heun, guided) and the student (1 and 2 steps, guidance built in) on the held-out prompts."""
    rows = []
    student = budget.student_label
    settings = [("teacher", teacher, Sampler(nfe=budget.teacher_nfe, solver="heun")),
                (student, scd, Sampler(steps=1)), (student, scd, Sampler(steps=2))]
    for label, path, sampler in settings:
        run = load_run(path)
        png = f"{'teacher' if path == teacher else 'scd'}-{sampler.evaluations(run)}nfe.png"
        row, _ = evaluate_setting(run, sampler, space, ref, budget.n_eval, batch=250, grid_path=out / png,
                                  guidance=budget.guidance, prompts=prompts)
        row["sampler"] += " (2 network evaluations per NFE)" if label == "teacher" else " (built in)"
        rows.append({"model": label, **row, "grid": png})
        _log(f"{label}, {row['sampler']}: {space.metric} {row[space.metric]:.1f}, digit accuracy "
             f"{100 * row.get('digit_accuracy', 0):.0f} %, attributes {100 * (row.get('attributes') or 0):.0f} %")
    return rows


def _prompt_grid(teacher: Path, scd: Path, budget: TextDemoBudget, path: Path) -> None:
    """One row per prompt of GRID_PROMPTS: `per_prompt` teacher images, a blank, the 2-step student's (same noise)."""
    k = budget.per_prompt
    asked = [p for p in GRID_PROMPTS for _ in range(k)]
    n, g = len(asked), budget.guidance
    a, _ = generate(load_run(teacher), n, Sampler(nfe=budget.teacher_nfe), prompt=asked, guidance=g, progress=False)
    b, _ = generate(load_run(scd), n, Sampler(steps=2), prompt=asked, guidance=g, progress=False)
    blank = -torch.ones(len(GRID_PROMPTS), 1, *a.shape[1:])
    rows = torch.cat([a.view(len(GRID_PROMPTS), k, *a.shape[1:]), blank, b.view(len(GRID_PROMPTS), k, *b.shape[1:])], 1)
    save_png(grid(rows.reshape(-1, *a.shape[1:]), nrow=2 * k + 1, scale=2), path)


def _report(result: dict) -> Report:
    m = result["metric"]
    r = Report("scm text-to-image demo: captioned MNIST, a text-conditioned teacher and its 2-step student")
    trained = ", ".join(f"{k} {v:g} kimg" for k, v in result["trained_kimg"].items())
    budget = result["budget"]
    r.text(f"Generated by `make demo-text` in {result['total_seconds'] / 60:.1f} minutes "
           f"({', '.join(f'{k}: {v:.0f} s' for k, v in result['stages_seconds'].items())}); the student trains to "
           f"{budget['scd_kimg']:g} kimg at batch {budget['scd_batch']} (P_mean {budget['scd_P_mean']:g}, learning "
           f"rate decaying from {budget['scd_lr_decay_kimg']:g} kimg){_vsd_phase(budget)}, or for at "
           f"most {budget['scd_minutes']:g} minutes ({trained} here).",
           f"Prompts: the first captions of MNIST's {result['n_eval']} first test digits (held out: teacher and "
           f"student trained on the training digits' captions). {m}: the Fréchet distance in the features of a small "
           "MNIST classifier (not FID) against the test digits; digit accuracy: the share of samples that classifier "
           "reads as the prompt's digit; attribute agreement: the share of the size / thickness / slant words asked "
           "for that the samples have, measured as for the captions (chance: about 25 % for size and thickness, "
           "25–50 % for slant).")
    share = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    r.table(["model", "sampler", "NFE", m, "digit accuracy", "attribute agreement", "ms / image"],
            [[row["model"], row["sampler"], row["nfe"], f"{row[m]:.1f}", share(row.get("digit_accuracy")),
              share(row.get("attributes")), f"{1000 * row['seconds_per_image']:.1f}"] for row in result["rows"]])
    r.heading("Prompt grid", 3).text(
        "One row per prompt (" + "; ".join(f"“{p}”" for p in result["grid_prompts"]) + "): the teacher's images "
        "(Heun ODE), then, after a blank, the 2-step student's from the same noise.").image("prompts.png", "prompts")
    for row in result["rows"]:
        name = f"{row['model']}, {row['sampler']}"
        r.heading(name, 3).image(row["grid"], name)
    return r


def _vsd_phase(budget: dict) -> str:
    if not budget.get("vsd_weight"):
        return ""
    return (f", with sCD + VSD from {budget['vsd_start_kimg']:g} kimg (λ {budget['vsd_weight']:g}, the critic at "
            f"{budget['critic_lr_scale']:g}× the learning rate)")
