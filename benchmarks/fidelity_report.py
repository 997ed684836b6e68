"""The report of benchmarks/fidelity_cpu.sh: benchmarks/results/fidelity-cpu/README.md from the eval and sweep
JSON files beside it. Each row: FD-MNIST mean ± 95 % t-interval over the sample seeds, and the ratio to the teacher
paired by seed (the same seed gives the same noise to every model on one machine).

    python benchmarks/fidelity_report.py [--teacher-minutes 65]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fidelity-cpu"
RUNS = ROOT / "benchmarks" / "runs" / "fidelity-cpu"
T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}


def interval(values):
    m = statistics.fmean(values)
    pm = T95.get(len(values), 2.0) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return m, pm


def scores(name):
    """{sampler description: {seed: FD}} of one run's eval files."""
    out = {}
    for path in sorted(RESULTS.glob(f"{name}-eval-*.json")):
        result = json.loads(path.read_text())
        for row in result["rows"]:
            out.setdefault(row["sampler"], {})[result["seed"]] = row[result["metric"]]
    return out


def trained(name):
    state = RUNS / name / "checkpoints"
    latest = (state / "latest").read_text().strip() if (state / "latest").is_file() else None
    info = json.loads((state / latest / "state.json").read_text()) if latest else {}
    cfg = json.loads((RUNS / name / "config.json").read_text()) if (RUNS / name / "config.json").is_file() else {}
    return info.get("kimg"), cfg.get("max_minutes")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher-minutes", type=float, default=65.0)
    args = p.parse_args()
    teacher = scores("teacher")
    t_row = teacher.get("heun ODE, 35 NFE", {})
    lines = ["# Issue 13 on this CPU: sCD and sCT against their teacher, same machine, with intervals", "",
             "Command: `SEEDS=\"0 1\" bash benchmarks/fidelity_cpu.sh` then `python benchmarks/fidelity_report.py`.",
             f"Teacher: `demo/teacher` (about {args.teacher_minutes:g} minutes of training on this kind of 2-core VM). "
             "FD-MNIST against the training set, n = 2000 per sample seed, seeds 0 1 2, unguided, EMA σ_rel = 0.05 "
             "(the run's first). ± is the 95 % t-interval over sample seeds; the ratio is to the teacher's Heun-35 "
             "with the same seed (min–max over seeds).", ""]
    if t_row:
        m, pm = interval(list(t_row.values()))
        lines += [f"Teacher, Heun 35 NFE: **{m:.1f} ± {pm:.1f}** (seeds: "
                  + ", ".join(f"{v:.1f}" for _, v in sorted(t_row.items())) + ")", ""]
    header = ["run", "training seed", "wall-clock (share of the teacher's)", "kimg", "1-step", "2-step",
              "2-step ÷ teacher"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for run in sorted(p.name for p in RUNS.iterdir() if p.is_dir()):
        s = scores(run)
        if not s:
            continue
        kimg, minutes = trained(run)
        share = f"{minutes:g} min ({minutes / args.teacher_minutes:.0%})" if minutes else "?"
        cells = []
        for key in ("1-step consistency", "2-step consistency"):
            vals = list(s.get(key, {}).values())
            cells.append("{:.1f} ± {:.1f}".format(*interval(vals)) if len(vals) > 1 else "–")
        two = s.get("2-step consistency", {})
        ratios = [two[k] / t_row[k] for k in two if k in t_row]
        ratio = f"{statistics.fmean(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else "–"
        method, _, seed = run.rpartition("-")
        lines.append(f"| {method} | {seed} | {share} | {kimg:.1f} | {cells[0]} | {cells[1]} | {ratio} |")
    sweeps = sorted(RESULTS.glob("*-ema/sweep.json"))
    if sweeps:
        lines += ["", "## Post-hoc EMA (`scm ema sweep RUN --steps 2`)", "",
                  "| run | σ_rel → 2-step FD-MNIST (mean over seeds) | best |", "|---|---|---|"]
        for path in sweeps:
            sweep = json.loads(path.read_text())
            metric = sweep["metric"]
            pairs = [(r["sigma_rel"], r[metric]) for r in sweep["rows"] if r.get(metric) is not None]
            best = sweep.get("best") or {}
            lines.append(f"| {path.parent.name.removesuffix('-ema')} | "
                         + ", ".join(f"{s:.3f} → {v:.1f}" for s, v in pairs)
                         + f" | {best.get('sigma_rel', '–')} ({best.get(metric, math.nan):.1f}) |")
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
