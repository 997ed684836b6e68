"""Reproduce the paper's claims at the scale a CPU allows, on MNIST: quality vs steps vs time, the ablations,
continuous vs discrete time, and how the 2-step gap to the teacher shrinks with the training budget.

    python benchmarks/reproduce.py [--kimg 4] [--n 400] [--teacher demo/teacher] [--dataset mnist]

Stages (each skipped when its results are already in the JSON; --force STAGE reruns one):
  teacher    the TrigFlow diffusion teacher: demo/teacher (trained by `scm train`, see its README) or --train-teacher
  teacher_eval  Euler (DDIM) at NFE 1, 2, 4, 8, 16, 35 and Heun at 3, 5, 9, 17, 35, 63 (2N − 1 evaluations)
  students   sCD (from the teacher), sCT (from the teacher's weights), sCT (from scratch); 1, 2 and 4 steps
  ablations  sCD with one change each (no tangent normalization, no adaptive weighting, no warm-up, RMS norm,
             extra 1/σ weight, bf16 with and without the JVP rearrangement) and sCT from scratch with
             c_noise = log σ + Fourier features (scale 16) instead of c_noise = t + positional embedding
  discrete   discrete-time CMs (Δt = (π/2)/N, N = 64 … 4096) vs the continuous objective, equal budget
  budgets    sCD and sCT at 1/4, 1/2 and 2× the budget: the trend of the 2-step gap with training
  speed      seconds per image: the teacher at 35 NFE and at its best NFE vs the CMs at 1 and 2 steps
Every number goes to benchmarks/results/reproduce-<dataset>.json; the report (tables, plots, sample grids) to
benchmarks/results/reproduce-<dataset>.md and the folder beside it. Training runs live in benchmarks/runs/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, machine

from scm.config import make_config
from scm.data.builtin import data_dir, fetch_mnist
from scm.evaluate import evaluate_setting
from scm.generate import Sampler, generate
from scm.metrics import open_reference
from scm.runs import load_run
from scm.train import train

ROOT = Path(__file__).resolve().parents[1]
NFES = (1, 2, 4, 8, 16, 35, 63)
ABLATIONS = {  # name: (base run, overrides) — one change each against the baseline named first
    "sCD (baseline)": ("scd", []),
    "no tangent normalization": ("scd", ["loss.tangent_norm_c=None"]),
    "no adaptive weighting": ("scd", ["loss.adaptive_weight=false"]),
    "no tangent warm-up": ("scd", ["loss.warmup_kimg=0"]),
    "RMS tangent norm": ("scd", ["loss.tangent_norm=rms"]),
    "extra 1/σ weight": ("scd", ["loss.extra_sigma_weight=true"]),
    "bf16, rearranged JVP": ("scd", ["precision=bf16"]),
    "bf16, unrearranged JVP": ("scd", ["precision=bf16", "loss.rearranged_jvp=false"]),
    "sCT scratch, c_noise = t (baseline)": ("sct-scratch", []),
    "sCT scratch, c_noise = log σ + Fourier(16)": ("sct-scratch", ["net.c_noise=log_sigma", "net.time_embed=fourier",
                                                                   "net.fourier_scale=16"]),
}
DISCRETE_N = (64, 256, 1024, 4096)
BUDGET_FRACTIONS = (0.25, 0.5, 2.0)  # of --kimg; 1.0 is the students' run


def log(msg: str) -> None:
    print(f"[reproduce] {msg}", file=sys.stderr, flush=True)


class Study:
    def __init__(self, args):
        self.args = args
        self.name = f"reproduce-{args.dataset}"
        self.json_path = RESULTS / f"{self.name}.json"
        self.assets = RESULTS / self.name
        self.work = ROOT / "benchmarks" / "runs" / self.name
        self.results = json.loads(self.json_path.read_text()) if self.json_path.is_file() else {}
        self.space = self.ref = None

    def save(self) -> None:
        self.results["machine"] = machine()
        self.results["command"] = " ".join(["python", *sys.argv])
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.results, indent=2) + "\n")

    def metric(self):
        if self.space is None:
            if self.args.dataset == "mnist" and not (data_dir() / "mnist" / "mnist.npz").is_file():
                fetch_mnist(log=log)
            self.space, self.ref = open_reference(self.args.dataset, log=log)
            self.results["metric"] = self.space.metric
        return self.space, self.ref

    # -- building blocks -------------------------------------------------------------------------------------------
    def train_run(self, key: str, preset: str, overrides: list[str], kimg: float, **flags) -> Path:
        out = self.work / key
        done = self.results.setdefault("runs", {}).get(key)
        interrupted = done and "interrupted" in done.get("status", "")  # stopped by a signal: not a result
        if done and not interrupted and (out / "config.json").is_file() and done.get("kimg") == kimg:
            return out
        if out.exists():
            shutil.rmtree(out)
        base = ["progress=false", "tensorboard=false", "sample_every_kimg=None", "sample_count=16",
                f"ckpt_every_kimg={kimg}", "log_every=5",
                f"max_minutes={max(2.0, kimg * 1000 / 15 / 60):.1f}"]  # a guard: slower than 15 img/s stops early
        cfg = make_config(preset, None, base + overrides, data=self.args.dataset, out=str(out), kimg=kimg,
                          batch=self.args.batch, **flags)
        t0 = time.perf_counter()
        log(f"training {key}: {preset} {' '.join(overrides)} for {kimg} kimg")
        try:
            train(cfg)
            status = "ok"
        except Exception as e:  # a diverging ablation is a result, not a crash of the study
            status = f"failed: {type(e).__name__}: {e}"
            log(f"{key}: {status}")
        trained = _trained_kimg(out)
        if status == "ok" and trained < 0.95 * kimg:
            status = f"ok (stopped by the time guard at {trained:.2f} kimg)"
        self.results["runs"][key] = {"preset": preset, "overrides": overrides, "kimg": kimg, "status": status,
                                     "seconds": round(time.perf_counter() - t0, 1), "curves": _curves(out)}
        self.save()
        return out

    def evaluate(self, run_dir: Path, sampler: Sampler, tag: str) -> dict:
        space, ref = self.metric()
        self.assets.mkdir(parents=True, exist_ok=True)
        row, _ = evaluate_setting(load_run(run_dir), sampler, space, ref, self.args.n, batch=250,
                                  grid_path=self.assets / f"{tag}.png")
        row["grid"] = f"{self.name}/{tag}.png"
        log(f"{tag}: {space.metric} {row[space.metric]:.1f}")
        return row

    def eval_steps(self, key: str, run_dir: Path, steps=(1, 2, 4)) -> list[dict]:
        rows = []
        for s in steps:
            rows.append(self.evaluate(run_dir, Sampler(steps=s), f"{key}-{s}step"))
        return rows

    # -- stages ----------------------------------------------------------------------------------------------------
    def stage_teacher(self):
        if self.args.train_teacher_kimg:
            path = self.train_run("teacher", f"tiny-{self.args.resolution}-diffusion", self.args.teacher_overrides,
                                  self.args.train_teacher_kimg)
        else:
            path = Path(self.args.teacher)
        run = load_run(path)
        readme = path / "README.md"
        self.results["teacher"] = {"path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                                   "step": run.step, "preset": run.cfg.preset,
                                   "notes": readme.read_text() if readme.is_file() else ""}

    def teacher_path(self) -> Path:
        p = Path(self.results["teacher"]["path"])
        return p if p.is_absolute() else ROOT / p

    def stage_teacher_eval(self):
        rows = []
        for nfe in NFES:  # Euler up to 35 NFE (it has long converged by then); Heun at the odd NFE next to each
            if nfe < NFES[-1]:
                rows.append(self.evaluate(self.teacher_path(), Sampler(nfe=nfe, solver="euler"),
                                          f"teacher-euler-{nfe}"))
            odd = nfe if nfe % 2 else nfe + 1
            if nfe > 1:
                rows.append(self.evaluate(self.teacher_path(), Sampler(nfe=odd, solver="heun"),
                                          f"teacher-heun-{odd}"))
        self.results["teacher_eval"] = rows

    def stage_students(self):
        k, teacher = self.args.kimg, str(self.teacher_path())
        res = self.args.resolution
        runs = {"scd": self.train_run("scd", f"tiny-{res}-scd", self.args.scd_overrides, k, teacher=teacher),
                "sct-init": self.train_run("sct-init", f"tiny-{res}-sct", self.args.sct_overrides, k, init=teacher),
                "sct-scratch": self.train_run("sct-scratch", f"tiny-{res}-sct", self.args.sct_scratch_overrides, k)}
        self.results["students"] = {key: self.eval_steps(key, path) for key, path in runs.items()}

    def stage_ablations(self):
        k, teacher, res = self.args.kimg, str(self.teacher_path()), self.args.resolution
        out = {}
        for name, (base, extra) in ABLATIONS.items():
            if not extra:  # the baseline is the students' run of the same budget: reuse it
                out[name] = {"run": base, "status": self.results["runs"][base]["status"],
                             "rows": [r for r in self.results["students"][base] if r["nfe"] <= 2]}
                continue
            key = "abl-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
            if base == "scd":
                path = self.train_run(key, f"tiny-{res}-scd", self.args.scd_overrides + extra, k, teacher=teacher)
            else:
                path = self.train_run(key, f"tiny-{res}-sct", self.args.sct_scratch_overrides + extra, k)
            status = self.results["runs"][key]["status"]
            rows = self.eval_steps(key, path, (1, 2)) if status.startswith("ok") else []
            out[name] = {"run": key, "status": status, "rows": rows}
        self.results["ablations"] = out

    def stage_discrete(self):
        k, teacher, res = self.args.kimg, str(self.teacher_path()), self.args.resolution
        out = {"continuous": {"run": "sct-init", "rows": self.results["students"]["sct-init"]}}
        for n in DISCRETE_N:
            key = f"discrete-{n}"
            path = self.train_run(key, f"tiny-{res}-sct", [*self.args.sct_overrides, f"loss.discrete_steps={n}"], k,
                                  init=teacher)
            out[f"N = {n}"] = {"run": key, "rows": self.eval_steps(key, path, (1, 2))}
        self.results["discrete"] = out

    def stage_budgets(self):
        teacher, res = str(self.teacher_path()), self.args.resolution
        out = {"sCD": [], "sCT (init)": []}
        for frac in BUDGET_FRACTIONS:
            k = round(self.args.kimg * frac, 3)
            scd = self.train_run(f"budget-scd-{frac}", f"tiny-{res}-scd", self.args.scd_overrides, k, teacher=teacher)
            sct = self.train_run(f"budget-sct-{frac}", f"tiny-{res}-sct", self.args.sct_overrides, k, init=teacher)
            out["sCD"].append({"kimg": k, "rows": self.eval_steps(f"budget-scd-{frac}", scd, (2,))})
            out["sCT (init)"].append({"kimg": k, "rows": self.eval_steps(f"budget-sct-{frac}", sct, (2,))})
        s = self.results["students"]
        out["sCD"].append({"kimg": self.args.kimg, "rows": [r for r in s["scd"] if r["nfe"] == 2]})
        out["sCT (init)"].append({"kimg": self.args.kimg, "rows": [r for r in s["sct-init"] if r["nfe"] == 2]})
        for pts in out.values():
            pts.sort(key=lambda p: p["kimg"])
        self.results["budgets"] = out

    def stage_speed(self):
        """Same machine, same batch, one process: time per image of each sampler (no metric)."""
        batch, n = 64, 256
        runs = {"teacher": self.teacher_path(), "sCD": self.work / "scd", "sCT": self.work / "sct-init"}
        best = min(self.results["teacher_eval"], key=lambda r: r[self.results["metric"]])
        settings = [("teacher", Sampler(nfe=35, solver="heun")),
                    ("teacher", Sampler(nfe=best["nfe"], solver="heun" if "heun" in best["sampler"] else "euler")),
                    ("sCD", Sampler(steps=1)), ("sCD", Sampler(steps=2)), ("sCT", Sampler(steps=1)),
                    ("sCT", Sampler(steps=2))]
        rows = []
        for model, sampler in settings:
            run = load_run(runs[model])
            generate(run, batch, sampler, batch=batch, progress=False)  # warm-up
            _, seconds = generate(run, n, sampler, batch=batch, seed=1, progress=False)
            rows.append({"model": model, "sampler": sampler.describe(run), "nfe": sampler.evaluations(run),
                         "seconds_per_image": seconds / n, "images_per_second": n / seconds})
        ref = rows[0]["seconds_per_image"]
        for r in rows:
            r["speedup_vs_teacher_35nfe"] = ref / r["seconds_per_image"]
        self.results["speed"] = {"batch": batch, "n": n, "threads": torch.get_num_threads(), "rows": rows}


def _trained_kimg(run: Path) -> float:
    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        return 0.0
    return float(json.loads((run / "checkpoints" / latest.read_text().strip() / "state.json").read_text())["kimg"])


def _curves(run: Path) -> dict:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = ("kimg", "loss", "grad_norm", "g_norm")
    return {k: [r.get(k) for r in rows if "loss" in r] for k in keys}


STAGES = ("teacher", "teacher_eval", "students", "ablations", "discrete", "budgets", "speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--kimg", type=float, default=4.0, help="training budget of every student / ablation run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=400, help="samples per evaluated setting")
    ap.add_argument("--teacher", default=str(ROOT / "demo" / "teacher"))
    ap.add_argument("--train-teacher-kimg", type=float, default=None, help="train a teacher instead")
    ap.add_argument("--force", action="append", default=[], choices=STAGES)
    ap.add_argument("--only", action="append", default=[], choices=STAGES)
    args = ap.parse_args()
    args.teacher_overrides = []
    args.scd_overrides = ["optim.lr=1e-3"]
    args.sct_overrides = ["optim.lr=1e-3"]
    args.sct_scratch_overrides = ["optim.lr=1e-2", "optim.lr_rampup_kimg=1"]
    study = Study(args)
    for stage in STAGES:
        if args.only and stage not in args.only:
            continue
        if stage in study.results and stage not in args.force:
            log(f"{stage}: done (skipped)")
            continue
        t0 = time.perf_counter()
        getattr(study, f"stage_{stage}")()
        study.results.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - t0, 1)
        study.save()
        log(f"{stage}: {time.perf_counter() - t0:.0f} s")
    from reproduce_report import write_report

    write_report(study.results, RESULTS / f"{study.name}.md", study.assets, study.name)
    log(f"report: {RESULTS / (study.name + '.md')}")


if __name__ == "__main__":
    main()
