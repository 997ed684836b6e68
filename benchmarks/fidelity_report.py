"""The fidelity study on a CPU: benchmarks/results/fidelity-cpu/{README.md,results.json} and its plots, from
the eval and sweep JSON files that `benchmarks/fidelity_cpu.sh` and `benchmarks/fidelity_curve.sh` write there.

Every figure is FD-MNIST (lower is better) as mean ± the 95 % t-interval over sample seeds; a ratio to the teacher
is paired by seed (the same seed gives every model the same noise on one machine) and shown as mean (min–max).

    python benchmarks/fidelity_report.py [--teacher-minutes 65]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from scm.metrics import seed_interval

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fidelity-cpu"
RUNS = ROOT / "benchmarks" / "runs"
ONE, TWO, HEUN = "1-step consistency", "2-step consistency", "heun ODE, 35 NFE"
TARGETS = {"scd": (1.10, 0.20, "1-step ≤ 1.5×"), "sct": (1.15, 0.40, None)}  # 2-step ratio, share of wall-clock


def interval(values: list[float]) -> dict:
    """Mean and half-width of the 95 % t-interval over seeds (None with one seed): `scm ema sweep`'s statistics."""
    spread = seed_interval(values)
    return {"mean": spread.mean, "pm": spread.half_width, "values": values}


def fmt(stat: dict | None) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.1f} ± {stat['pm']:.1f}" if stat["pm"] is not None else f"{stat['mean']:.1f} (1 seed)"


def fmt_ratio(r: dict | None) -> str:
    return f"{r['mean']:.2f} ({r['min']:.2f}–{r['max']:.2f})" if r else "–"


def scores(pattern: str, folder: Path = RESULTS) -> dict:
    """{sampler: {seed: FD}} over the eval files matching pattern."""
    out: dict = {}
    for path in sorted(folder.glob(pattern)):
        result = json.loads(path.read_text())
        for row in result["rows"]:
            out.setdefault(row["sampler"], {})[result["seed"]] = row[result["metric"]]
    return out


def paired(student: dict, teacher: dict) -> dict | None:
    ratios = [student[s] / teacher[s] for s in student if s in teacher]
    return {"mean": statistics.fmean(ratios), "min": min(ratios), "max": max(ratios), "seeds": len(ratios)} \
        if ratios else None


def minutes_at(run: Path, step: int) -> float:
    """Training wall-clock at `step`, interpolated in the run's metrics.jsonl (logged every few steps)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open() if line.strip()]
    pts = [(0, 0.0)] + [(r["step"], r["time"]) for r in rows if "step" in r and "time" in r]
    for (s0, t0), (s1, t1) in itertools.pairwise(pts):
        if s0 <= step <= s1:
            return (t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)) / 60
    return pts[-1][1] / 60


def trained(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    return {"kimg": state["kimg"], "minutes": minutes_at(run, state["step"]), "budget_minutes": cfg.get("max_minutes"),
            "batch": cfg["batch"]}


def headline(teacher_minutes: float) -> dict:
    teacher = scores("teacher-eval-*.json").get(HEUN, {})
    out = {"teacher": {"run": "demo/teacher", "minutes": teacher_minutes, "heun35": interval(list(teacher.values()))
                       if teacher else None, "per_seed": teacher}, "runs": {}}
    for run in sorted((RUNS / "fidelity-cpu").glob("*-[0-9]")):
        s = scores(f"{run.name}-eval-*.json")
        if not s:
            continue
        info = trained(run)
        row = {**info, "share": info["minutes"] / teacher_minutes}
        for key, sampler in (("1step", ONE), ("2step", TWO)):
            if s.get(sampler):
                row[key] = interval(list(s[sampler].values()))
                row[key + "_ratio"] = paired(s[sampler], teacher)
        out["runs"][run.name] = row
    return out


def t_mid(teacher: dict) -> dict:
    """2-step quality against the intermediate time t_mid (`scm eval --ts t_max,t_mid`) of the seed-0 runs."""
    out = {}
    for run in ("scd-0", "scd-1", "sct-0", "sct-1"):
        s = scores(f"{run}-tmid-*.json")
        out[run] = [{"t_mid": float(sampler.rsplit(", ", 1)[1]), "fd": interval(list(v.values())),
                     "ratio": paired(v, teacher)} for sampler, v in s.items()]
    return {k: v for k, v in out.items() if v}


def curves() -> dict:
    """Quality against training wall-clock: fidelity-curve's teacher and sCT from scratch (checkpoints) and the
    seed-0 sCD and sCT-init runs of fidelity-cpu (their σ_rel = 0.05 EMA snapshots)."""
    out = {}
    sources = [("teacher", RUNS / "fidelity-curve" / "teacher", "curve/teacher-*-eval-*.json"),
               ("sct-scratch", RUNS / "fidelity-curve" / "sct-scratch", "curve/sct-scratch-*-eval-*.json"),
               ("scd-0", RUNS / "fidelity-cpu" / "scd-0", "curve/scd-0-*-eval-*.json"),
               ("sct-0", RUNS / "fidelity-cpu" / "sct-0", "curve/sct-0-*-eval-*.json")]
    for name, run, pattern in sources:
        tokens = {p.name.split("-eval-")[0].rsplit("-", 1)[1] for p in RESULTS.glob(pattern)}  # the step, as named
        if not tokens or not run.is_dir():
            continue
        batch = json.loads((run / "config.json").read_text())["batch"]
        points = []
        for token in sorted(tokens, key=int):
            step, s = int(token), scores(pattern.replace("-*-eval-", f"-{token}-eval-"))
            points.append({"step": step, "kimg": step * batch / 1000, "minutes": minutes_at(run, step),
                           **{k: interval(list(s[v].values())) for k, v in (("1step", ONE), ("2step", TWO),
                                                                            ("heun35", HEUN)) if s.get(v)}})
        out[name] = points
    return out


def sweeps() -> dict:
    out = {}
    for path in sorted(RESULTS.glob("**/*-ema/sweep.json")):
        sweep = json.loads(path.read_text())
        out[path.parent.name.removesuffix("-ema")] = {
            "sampler": sweep["sampler"], "n": sweep["n"], "seeds": sweep["seeds"], "kimg": sweep["kimg"],
            "best": sweep["best"], "command": sweep["command"],
            "rows": [{"sigma_rel": r["sigma_rel"], "fd": r[sweep["metric"]], "interval": r["interval"]}
                     for r in sweep["rows"]]}
    return out


LABELS = {"teacher": ("diffusion teacher, Heun 35 NFE", "heun35", "k"),
          "sct-scratch": ("sCT from scratch", None, "C0"), "scd-0": ("sCD (from demo/teacher)", None, "C3"),
          "sct-0": ("sCT from demo/teacher's weights", None, "C2")}


def save(plt, fig, ax, ylabel: str, name: str) -> str:
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)
    plt.close(fig)
    return name


def plot(curve: dict, sweep: dict, teacher: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if curve:
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for name, points in curve.items():
            label, key, color = LABELS[name]
            for k, ls in [(key, "-")] if key else [("2step", "-"), ("1step", ":")]:
                pts = [p for p in points if k in p]
                if not pts:
                    continue
                xs, ys = [p["minutes"] for p in pts], [p[k]["mean"] for p in pts]
                ax.plot(xs, ys, ls, marker="o", ms=3, color=color,
                        label=label + ("" if key else f", {k[0]} step{'s' if k[0] == '2' else ''}"))
                for p in pts:
                    if p[k]["pm"] is not None:
                        ax.plot([p["minutes"]] * 2, [p[k]["mean"] - p[k]["pm"], p[k]["mean"] + p[k]["pm"]],
                                color=color, alpha=0.4, lw=1)
        if teacher:
            ax.axhline(teacher["mean"], color="0.5", ls="--", lw=1,
                       label="demo/teacher, Heun 35 NFE (65 min; n = 2000)")
        ax.set_xlabel("training wall-clock (minutes, this 2-core VM; see the README for cores per run)")
        written.append(save(plt, fig, ax, "FD-MNIST (n = 1000 per seed)", "quality_vs_wallclock.png"))
    if sweep:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, (name, s) in enumerate(sweep.items()):
            xs, ys = [r["sigma_rel"] for r in s["rows"]], [r["fd"] for r in s["rows"]]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{name}: {s['sampler']}, best {s['best']['sigma_rel']:g}")
        ax.set_xscale("log")
        ax.set_xlabel("σ_rel (post-hoc EMA)")
        written.append(save(plt, fig, ax, "FD-MNIST", "quality_vs_sigma_rel.png"))
    return written


def markdown(results: dict, plots: list[str]) -> str:
    head, minutes = results["headline"], results["headline"]["teacher"]["minutes"]
    t = head["teacher"]["heun35"]
    lines = ["# Fidelity on this CPU: sCD and sCT against their teacher, same machine, with intervals", "",
             "Commands: `SEEDS=\"0 1\" bash benchmarks/fidelity_cpu.sh`, `bash benchmarks/fidelity_curve.sh`, then "
             "`python benchmarks/fidelity_report.py` (numbers: `results.json`). FD-MNIST against the training set, "
             "unguided, EMA σ_rel = 0.05 unless a sweep says otherwise. ± is the 95 % t-interval over sample seeds "
             "0 1 2; a ratio is to the teacher's Heun-35 with the same seed, mean (min–max).", "",
             "## Headline: students of `demo/teacher` (n = 2000 per sample seed)", "",
             f"Teacher `demo/teacher`, {minutes:g} minutes of training on this kind of VM: Heun 35 NFE "
             f"**{fmt(t)}**.", "",
             "| run | training seed | wall-clock (share of the teacher's) | kimg | 1-step | 1-step ÷ teacher | "
             "2-step | 2-step ÷ teacher | target |", "|---" * 9 + "|"]
    for name, r in head["runs"].items():
        method, _, seed = name.rpartition("-")
        limit, share, extra = TARGETS[method]
        target = f"2-step ≤ {limit}× at ≤ {share:.0%}" + (f"; {extra}" if extra else "")
        lines.append(f"| {method} | {seed} | {r['minutes']:.1f} min ({r['share']:.0%}) | {r['kimg']:.1f} | "
                     f"{fmt(r.get('1step'))} | {fmt_ratio(r.get('1step_ratio'))} | {fmt(r.get('2step'))} | "
                     f"{fmt_ratio(r.get('2step_ratio'))} | {target} |")
    if results["t_mid"]:
        columns = sorted({p["t_mid"] for points in results["t_mid"].values() for p in points})
        lines += ["", "### 2 steps: the intermediate time t_mid (`scm eval --ts 1.5645,T`; paper 1.1, diffusers "
                  "SCMScheduler's default 1.3)", "", "| run | " + " | ".join(f"t_mid {c:g}" for c in columns) + " |",
                  "|---" * (1 + len(columns)) + "|"]
        for name, points in results["t_mid"].items():
            by = {p["t_mid"]: p for p in points}
            lines.append(f"| {name} | " + " | ".join(f"{fmt(by[c]['fd'])} ({fmt_ratio(by[c]['ratio'])})" if c in by
                                                     else "–" for c in columns) + " |")
    if results["curves"]:
        lines += ["", "## Quality against training wall-clock (n = 1000 per sample seed)", ""]
        if "quality_vs_wallclock.png" in plots:
            lines += ["![quality vs wall-clock](quality_vs_wallclock.png)", ""]
        for name, points in results["curves"].items():
            label, key, _ = LABELS[name]
            cols = [key] if key else ["1step", "2step"]
            lines += [f"**{label}** (`{name}`)", "", "| minutes | kimg | " + " | ".join(cols) + " |",
                      "|---" * (2 + len(cols)) + "|"]
            lines += [f"| {p['minutes']:.1f} | {p['kimg']:.1f} | " + " | ".join(fmt(p.get(c)) for c in cols) + " |"
                      for p in points]
            lines.append("")
    if results["sweeps"]:
        lines += ["## Post-hoc EMA: quality against σ_rel (`scm ema sweep`)", ""]
        if "quality_vs_sigma_rel.png" in plots:
            lines += ["![quality vs σ_rel](quality_vs_sigma_rel.png)", ""]
        lines += ["| run | sampler, n × seeds | σ_rel → FD-MNIST | best σ_rel | FD at 0.05 → best |", "|---" * 5 + "|"]
        for name, s in results["sweeps"].items():
            at05 = min(s["rows"], key=lambda r: abs(r["sigma_rel"] - 0.05))
            best = min(r["fd"] for r in s["rows"])
            lines.append(f"| {name} | {s['sampler']}, {s['n']} × {len(s['seeds'])} | "
                         + ", ".join(f"{r['sigma_rel']:.3g} → {r['fd']:.1f}" for r in s["rows"])
                         + f" | {s['best']['sigma_rel']:g} | {at05['fd']:.1f} → {best:.1f} |")
    discussion = RESULTS / "discussion.md"
    if discussion.is_file():
        lines += ["", discussion.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher-minutes", type=float, default=65.0, help="demo/teacher's training wall-clock")
    args = p.parse_args()
    results = {"headline": headline(args.teacher_minutes), "curves": curves(), "sweeps": sweeps()}
    results["t_mid"] = t_mid(results["headline"]["teacher"]["per_seed"])
    plots = plot(results["curves"], results["sweeps"], results["headline"]["teacher"]["heun35"])
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "README.md").write_text(markdown(results, plots))
    print((RESULTS / "README.md").read_text())


if __name__ == "__main__":
    main()
