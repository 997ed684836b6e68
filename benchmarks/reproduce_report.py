"""The Markdown report of benchmarks/reproduce.py: tables, plots and sample grids from the results JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from scm.app.report import Report, inline_image


def _m(results: dict) -> str:
    return results.get("metric", "FD-MNIST")


def headline(results: dict) -> dict:
    """2-step quality as a fraction of the teacher's best, and the wall-clock speed-up vs 35-NFE sampling."""
    m = _m(results)
    best = min(results["teacher_eval"], key=lambda r: r[m])
    out = {"teacher_best": best[m], "teacher_best_sampler": best["sampler"]}
    for key, name in (("scd", "sCD"), ("sct-init", "sCT")):
        two = next(r for r in results["students"][key] if r["nfe"] == 2)
        out[f"{name}_2step"] = two[m]
        out[f"{name}_2step_over_teacher"] = two[m] / best[m]
    speed = {(r["model"], r["nfe"]): r for r in results.get("speed", {}).get("rows", [])}
    if speed:
        out["speedup_2step_vs_35nfe"] = {name: speed[(name, 2)]["speedup_vs_teacher_35nfe"] for name in ("sCD", "sCT")
                                         if (name, 2) in speed}
    out["budget_fit"] = {name: _fit(results, name, best[m]) for name in ("sCD", "sCT (init)")
                         if "budgets" in results}
    return out


def _fit(results: dict, name: str, best: float) -> dict:
    """Fit log(FD_2step/best − 1) = a + b·log(kimg) and solve for the 10 % gap."""
    m = _m(results)
    pts = [(b["kimg"], b["rows"][0][m] / best - 1) for b in results["budgets"][name] if b["rows"]]
    pts = [(k, g) for k, g in pts if g > 0]
    if len(pts) < 2:
        return {"points": pts}
    xs, ys = [math.log(k) for k, _ in pts], [math.log(g) for _, g in pts]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    fit = {"points": pts, "slope": b}
    if b < 0:
        fit["kimg_for_10_percent"] = math.exp((math.log(0.10) - a) / b)
    return fit


def _fidelity(report: Report, folder: Path) -> None:
    """The fidelity study at its budgets, with intervals (benchmarks/fidelity_report.py writes it)."""
    path = folder / "results.json"
    if not path.is_file():
        return
    f = json.loads(path.read_text())
    t = f["headline"]["teacher"]
    rows = []
    for name, r in f["headline"]["runs"].items():
        cells = []
        for k in ("1step", "2step"):
            stat, ratio = r.get(k), r.get(f"{k}_ratio")
            cells.append(f"{stat['mean']:.1f} ± {stat['pm']:.1f}" + (f" ({ratio['mean']:.2f}×)" if ratio else "")
                         if stat and stat["pm"] is not None else "-")
        rows.append([name, f"{r['minutes']:.0f} min ({r['share']:.0%})", f"{r['kimg']:.0f}", *cells])
    heun = t["heun35"]
    report.heading("Fidelity at the teacher's budget, with intervals").text(
        f"From `{folder.name}/` (its README has the commands, the curves against wall-clock, the post-hoc EMA sweeps "
        f"and the discussion). FD-MNIST, n = 2000 × sample seeds 0–2, mean ± 95 % interval, unguided; × is the ratio "
        f"to the teacher's Heun-35 paired by seed. Teacher {t['run']} ({t['minutes']:g} min): "
        + (f"{heun['mean']:.1f} ± {heun['pm']:.1f}." if heun and heun["pm"] is not None else "not evaluated."))
    report.table(["run (method-training seed)", "wall-clock (share of the teacher's)", "kimg", "1-step", "2-step"],
                 rows)
    if (folder / "quality_vs_wallclock.png").is_file():
        report.image(f"{folder.name}/quality_vs_wallclock.png", "quality vs wall-clock")


def _table(report: Report, rows: list[dict], m: str, first: str = "sampler") -> None:
    out = []
    for r in rows:
        conf = f"{100 * r['confident']:.0f} %" if "confident" in r else "-"
        prec = f"{r['precision']:.2f}" if "precision" in r else "-"
        rec = f"{r['recall']:.2f}" if "recall" in r else "-"
        out.append([r.get("label", r["sampler"]), r["nfe"], f"{r[m]:.1f}", prec, rec, conf,
                    f"{1000 * r['seconds_per_image']:.1f}", inline_image(r["grid"])])
    report.table([first, "NFE", m, "precision", "recall", "confident", "ms / image", "samples"], out)


def _plots(results: dict, assets: Path, name: str) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    m, out = _m(results), {}
    assets.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for solver in ("euler", "heun"):
        rows = [r for r in results["teacher_eval"] if r["sampler"].startswith(solver)]
        ax.plot([r["nfe"] for r in rows], [r[m] for r in rows], "o-", label=f"teacher, {solver}")
    for key, label in (("scd", "sCD"), ("sct-init", "sCT (from teacher)"), ("sct-scratch", "sCT (scratch)")):
        rows = results["students"][key]
        ax.plot([r["nfe"] for r in rows], [r[m] for r in rows], "s--", label=label)
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=m, title="quality vs network evaluations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(assets / "quality_vs_nfe.png", dpi=90)
    plt.close(fig)
    out["quality"] = f"{name}/quality_vs_nfe.png"
    if "ablations" in results:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for label, a in results["ablations"].items():
            c = results["runs"][a["run"]]["curves"]
            if c.get("kimg"):
                axes[0].plot(c["kimg"], c["grad_norm"], label=label)
                axes[1].plot(c["kimg"], c["loss"], label=label)
        axes[0].set(yscale="log", xlabel="kimg", title="gradient norm")
        axes[1].set(xlabel="kimg", title="loss (e^w·mse − w)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(assets / "ablation_curves.png", dpi=90)
        plt.close(fig)
        out["ablations"] = f"{name}/ablation_curves.png"
    return out


def write_report(results: dict, path: Path, assets: Path, name: str) -> None:
    m = _m(results)
    h = headline(results) if "students" in results and "teacher_eval" in results else {}
    plots = _plots(results, assets, name) if h else {}
    R = Report(f"Reproducing sCM's claims on {name.split('-', 1)[1].upper()} at CPU scale")
    R.text(f"Command: `{results.get('command', '')}`  \nMachine: {results.get('machine', {})}",
           f"Quality metric: {m} — the Fréchet distance in the features of a small classifier trained on the data "
           "set (not FID; lower is better), each row from the same number of samples against the training set.")
    if h:
        items = [f"Teacher's best: {m} {h['teacher_best']:.1f} ({h['teacher_best_sampler']}).",
                 f"2-step sCD: {h['sCD_2step']:.1f} = **{h['sCD_2step_over_teacher']:.2f}× the teacher's best** "
                 f"(the paper's claim: within 1.1×); 2-step sCT: {h['sCT_2step']:.1f} = "
                 f"**{h['sCT_2step_over_teacher']:.2f}×** (claim here: within 1.15×)."]
        if h.get("speedup_2step_vs_35nfe"):
            items.append("Wall-clock per image, 2-step vs the teacher at 35 NFE, same machine and batch: " + ", ".join(
                f"**{k} {v:.1f}× faster**" for k, v in h["speedup_2step_vs_35nfe"].items()) + ".")
        for k, fit in h.get("budget_fit", {}).items():
            if "kimg_for_10_percent" in fit:
                items.append(f"{k}: the 2-step gap to the teacher falls as kimg^{fit['slope']:.2f}; at that rate it "
                             f"reaches 10 % after about {fit['kimg_for_10_percent']:.0f} kimg of training.")
            elif "slope" in fit:
                items.append(f"{k}: the 2-step gap did not fall with budget here (slope {fit['slope']:.2f}).")
        R.heading("Headline").bullets(items)
    _fidelity(R, path.parent / "fidelity-cpu")
    if "teacher" in results:
        t = results["teacher"]
        R.heading("Teacher").text(f"{t['path']} (step {t['step']}, preset {t['preset']}).")
        R.markdown_text(t.get("notes", ""))
    if "teacher_eval" in results:
        R.heading("Teacher: first- and second-order ODE samplers")
        _table(R, results["teacher_eval"], m)
        if plots.get("quality"):
            R.image(plots["quality"], "quality vs NFE")
    if "students" in results:
        R.heading("Students (equal budget)")
        for key, label in (("scd", "sCD (from the teacher)"), ("sct-init", "sCT (from the teacher's weights)"),
                           ("sct-scratch", "sCT (from scratch)")):
            run = results["runs"][key]
            R.heading(f"{label}: {run['kimg']} kimg, {run['seconds'] / 60:.1f} min", 3)
            _table(R, results["students"][key], m)
    if "ablations" in results:
        rows = []
        for label, a in results["ablations"].items():
            by_nfe = {r["nfe"]: r for r in a["rows"]}
            curves = results["runs"][a["run"]]["curves"]
            gmax = max((g for g in curves.get("grad_norm", []) if g is not None), default=float("nan"))
            cells = [f"{by_nfe[k][m]:.1f}" if k in by_nfe else "-" for k in (1, 2)]
            grids = " ".join(inline_image(by_nfe[k]["grid"]) for k in (1, 2) if k in by_nfe) or "-"
            rows.append([label, a["status"], *cells, f"{gmax:.3g}", grids])
        R.heading("Ablations (one change each, equal budget)")
        R.table(["run", "status", f"1-step {m}", f"2-step {m}", "max gradient norm", "samples"], rows)
        if plots.get("ablations"):
            R.image(plots["ablations"], "ablation curves")
    if "discrete" in results:
        rows = []
        for label, d in results["discrete"].items():
            by_nfe = {r["nfe"]: r for r in d["rows"]}
            rows.append([label, f"{by_nfe[1][m]:.1f}", f"{by_nfe[2][m]:.1f}",
                         f"{inline_image(by_nfe[1]['grid'])} {inline_image(by_nfe[2]['grid'])}"])
        R.heading("Continuous vs discrete time (sCT from the teacher's weights, equal budget)")
        R.table(["objective", f"1-step {m}", f"2-step {m}", "samples (1, 2 steps)"], rows)
    if "budgets" in results:
        rows = [[name_, p["kimg"], f"{p['rows'][0][m]:.1f}", inline_image(p["rows"][0]["grid"])]
                for name_, pts in results["budgets"].items() for p in pts if p["rows"]]
        R.heading("The 2-step gap with training budget").table(["model", "kimg", f"2-step {m}", "samples"], rows)
    if "speed" in results:
        sp = results["speed"]
        R.heading(f"Speed (batch {sp['batch']}, {sp['n']} images, {sp['threads']} threads, one process)")
        R.table(["model", "sampler", "NFE", "ms / image", "images / s", "speed-up vs teacher at 35 NFE"],
                [[r["model"], r["sampler"], r["nfe"], f"{1000 * r['seconds_per_image']:.2f}",
                  f"{r['images_per_second']:.1f}", f"{r['speedup_vs_teacher_35nfe']:.1f}×"] for r in sp["rows"]])
    discussion = path.with_name(path.stem + "-discussion.md")  # written by hand after reading the numbers
    if discussion.is_file():
        R.markdown_text(discussion.read_text())
    R.write(path)
