"""Video and audio against their teachers on a CPU: benchmarks/results/av-fidelity/{README.md,results.json}, from
the eval files, configs and training logs that `benchmarks/av_fidelity.sh` writes there.

Quality is the data set's classifier Fréchet distance (FD-MovingMNIST, FD-SpokenDigits: not FVD, not FAD; lower is
better) as mean ± the 95 % t-interval over sample seeds; a ratio to the teacher is paired by seed and shown as
mean (min–max). The step cost is the training throughput of the teacher over that of the run (its logged clips/s,
median over the log lines after the first); the sampling speed-up is the teacher's Heun-35 seconds per clip over
the student's, measured by `scm eval` on the same machine.

    python benchmarks/av_fidelity_report.py [--results benchmarks/results/av-fidelity]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

from fidelity_report import fmt, fmt_ratio, interval, paired

RESULTS = Path(__file__).resolve().parent / "results" / "av-fidelity"
ONE, TWO, HEUN = "1-step consistency", "2-step consistency", "heun ODE, 35 NFE"
MODALITIES = {"video": ("moving-mnist-tiny", "clips 1×8×32×32"), "audio": ("spoken-digits", "1 s at 16 kHz")}
RUNS = ("teacher", "scd", "sct")


def rows(name: str, run: str) -> dict:
    """{sampler: {seed: row}} of one run's eval files (the row carries the metric's name under "metric")."""
    out: dict = {}
    for path in sorted(RESULTS.glob(f"{name}-{run}-eval-*.json")):
        result = json.loads(path.read_text())
        for row in result["rows"]:
            out.setdefault(row["sampler"], {})[result["seed"]] = row | {"metric": result["metric"]}
    return out


def training(name: str, run: str) -> dict:
    """What a run's log says: minutes, kimg reached, median training throughput, and its budget setting."""
    lines = [json.loads(x) for x in (RESULTS / f"{name}-{run}-metrics.jsonl").read_text().splitlines() if x.strip()]
    cfg = json.loads((RESULTS / f"{name}-{run}-config.json").read_text())
    steady = lines[1:] or lines
    return {"minutes": lines[-1]["time"] / 60, "kimg": lines[-1]["kimg"], "max_minutes": cfg.get("max_minutes"),
            "clips_per_s": statistics.median(r["img_per_s"] for r in steady), "batch": cfg["batch"],
            "preset": cfg.get("preset")}


def figure(by_seed: dict, key: str, scale: float = 1.0) -> dict | None:
    values = [r[key] * scale for r in by_seed.values() if r.get(key) is not None]
    return interval(values) if values else None


def modality(name: str) -> dict:
    """Every figure of one modality: per run and sampler, quality with intervals, ratios, costs."""
    teacher_rows = rows(name, "teacher").get(HEUN, {})
    metric = next(iter(teacher_rows.values()))["metric"]
    fd = lambda by_seed: {s: r[metric] for s, r in by_seed.items()}  # noqa: E731
    teach = training(name, "teacher")
    out = {"metric": metric, "runs": {}}
    for run in RUNS:
        info = training(name, run)
        info["share_of_teacher_minutes"] = info["minutes"] / teach["minutes"]
        info["step_cost_vs_teacher"] = teach["clips_per_s"] / info["clips_per_s"]
        samplers = {}
        for sampler, by_seed in rows(name, run).items():
            seconds = statistics.median(r["seconds_per_image"] for r in by_seed.values())
            samplers[sampler] = {
                "nfe": next(iter(by_seed.values()))["nfe"], "n": next(iter(by_seed.values()))["n"],
                metric: figure(by_seed, metric), "ratio": paired(fd(by_seed), fd(teacher_rows)),
                "class_accuracy_pct": figure(by_seed, "accuracy", 100),
                "FD-MNIST-frames": figure(by_seed, "FD-MNIST-frames"),
                "temporal_consistency_pct": figure(by_seed, "temporal_consistency", 100),
                "seconds_per_clip": seconds,
                "speedup_vs_teacher": statistics.median(r["seconds_per_image"] for r in teacher_rows.values())
                / seconds}
        out["runs"][run] = {"training": info, "samplers": samplers}
    return out


def markdown(results: dict) -> str:
    lines = ["# Video and audio: sCD and sCT against their teacher on a CPU, with intervals", "",
             "Commands: `bash benchmarks/av_fidelity.sh`, then `python benchmarks/av_fidelity_report.py` (numbers: "
             "`results.json`). Class-conditional, unguided; each test split is the reference; EMA σ_rel = 0.05. "
             "± is the 95 % t-interval over sample seeds 0 1 2; a ratio to the teacher's Heun-35 is paired by seed, "
             "mean (min–max). FD-MovingMNIST and FD-SpokenDigits are Fréchet distances in small classifiers "
             "trained on the data sets (benchmarks/results/av_classifiers.md), **not FVD or FAD**.", "",
             f"Machine: {results['machine']}.", ""]
    for name, m in results["modalities"].items():
        data, what = MODALITIES[name]
        metric, t = m["metric"], m["runs"]["teacher"]
        lines += [f"## {name.capitalize()}: `{data}` ({what})", "",
                  f"Teacher `{t['training']['preset']}`: {t['training']['minutes']:.1f} min, "
                  f"{t['training']['kimg']:.1f} kimg, {t['training']['clips_per_s']:.1f} clips/s in training.", ""]
        header = ["run", "sampler", "NFE", "training minutes (share of the teacher's)", "kimg",
                  "step cost ÷ teacher's", metric, "÷ teacher", "class accuracy",
                  *(["FD-MNIST-frames", "temporal consistency"] if name == "video" else []), "s / clip", "speed-up"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for run, r in m["runs"].items():
            tr = r["training"]
            for sampler, s in r["samplers"].items():
                cells = [run, sampler, s["nfe"], f"{tr['minutes']:.1f} ({tr['share_of_teacher_minutes']:.0%})",
                         f"{tr['kimg']:.1f}", f"{tr['step_cost_vs_teacher']:.2f}", fmt(s[metric]),
                         fmt_ratio(s["ratio"]) if run != "teacher" else "1", fmt(s["class_accuracy_pct"]) + " %"]
                if name == "video":
                    cells += [fmt(s["FD-MNIST-frames"]), fmt(s["temporal_consistency_pct"]) + " %"]
                cells += [f"{s['seconds_per_clip']:.4f}", f"{s['speedup_vs_teacher']:.0f}×"]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the folder av_fidelity.sh wrote (its OUT)")
    RESULTS = ap.parse_args().results
    results = {"command": "bash benchmarks/av_fidelity.sh && python benchmarks/av_fidelity_report.py",
               "machine": f"{platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, "
                          "one torch thread per modality, the two side by side on 2 cores",
               "modalities": {name: modality(name) for name in MODALITIES
                              if any(RESULTS.glob(f"{name}-teacher-eval-*.json"))}}  # ONLY= runs hold one
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    readme = RESULTS / "README.md"
    kept = readme.read_text().split("\n## Discussion", 1)[1] if readme.is_file() and "\n## Discussion" in \
        readme.read_text() else None
    readme.write_text(markdown(results) + ("\n## Discussion" + kept if kept else ""))
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()
