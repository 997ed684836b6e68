"""`scm ema …`: post-hoc EMA (EDM2 §3.2, App. C.3) from the snapshots a run keeps (ema.snapshot_kimg).

    scm ema reconstruct RUN --sigma-rel 0.07 [--sigma-rel 0.15 …] --out OUT [--at-kimg K]
    scm ema sweep RUN --ref mnist [--sigma-rels 0.03,0.05,…] [--steps N | --nfe N] [--n N] [--seeds 0,1,2] --out DIR

`reconstruct` writes a run directory that `scm sample --ckpt OUT --ema S`, `scm eval`, `--teacher` and `--init`
read like any run; `sweep` measures each σ_rel (reconstructed in memory) with `scm eval`'s metric. The library
does the work (scm.train.ema, scm.evaluate); this module parses, prints and words errors (scm.app.cli)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["ema_app"]

ema_app = typer.Typer(no_args_is_help=True, help="Post-hoc EMA (EDM2): any σ_rel from a run's EMA snapshots.")

# how the library's settings are spelled here (over scm.app.cli.FLAGS / HINTS)
EMA_FLAGS = {"sigma_rel": "--sigma-rel", "at_kimg": "--at-kimg", "max_error": "--max-error", "out": "--out",
             "ref": "--ref"}
EMA_HINTS = {"out": "choose another --out",
             "run": "keep snapshots with ema.snapshot_kimg > 0 (the default) when training"}

RUN_ARG = Annotated[str, typer.Argument(help="a run directory trained with EMA snapshots (ema.snapshot_kimg)")]
AT_KIMG = Annotated[float | None, typer.Option(help="the training time to reconstruct at, in kimg (rounded to a "
                                                    "whole step; default: the last snapshot)")]
MAX_ERROR = Annotated[float, typer.Option(help="the largest relative L² error of a σ_rel's reconstructed averaging "
                                               "profile to accept (0.05: closer than a σ_rel 4–7 % away)")]


@ema_app.command("reconstruct")
def reconstruct(
    run: RUN_ARG,
    sigma_rel: Annotated[list[float], typer.Option(help="σ_rel to reconstruct (repeatable; the first is the new "
                                                        "run's default EMA)")],
    out: Annotated[str, typer.Option(help="the run directory to create")],
    at_kimg: AT_KIMG = None,
    max_error: MAX_ERROR = 0.05,
):
    """Reconstruct the power-function EMA of any σ_rel from RUN's snapshots into a new run directory OUT (RUN is
    only read)."""
    from scm.app.cli import USER_ERRORS, _fail_on
    from scm.train.ema import plan_reconstruction, save_reconstruction

    try:
        rec = plan_reconstruction(run, sigma_rel, at_kimg=at_kimg, max_error=max_error)
        path = save_reconstruction(rec, out)
    except USER_ERRORS as e:
        _fail_on(e, EMA_FLAGS, EMA_HINTS)
    for s in rec.stds:
        print(f"σ_rel {s:g}: {len(rec.snapshots)} snapshots × {len(rec.profiles)} profiles, relative L² error of the "
              f"profile {rec.errors[s]:.4f}")
    lo_hi = f"[{rec.representable[0]:g}, {rec.representable[1]:g}]" if rec.representable else "none"
    print(f"wrote {path} (at {rec.cur_nimg / 1000:g} kimg, step {rec.step}; σ_rel these snapshots represent within "
          f"{rec.max_error:g}: {lo_hi})", file=sys.stderr)


def _floats(text: str, flag: str) -> list[float]:
    from scm.app.cli import _fail

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.03,0.05,0.1")
    if not values:
        _fail(f"{flag} {text!r}: give at least one value")
    return values


def _ints(text: str, flag: str) -> list[int]:
    values = _floats(text, flag)
    if not all(v.is_integer() for v in values):
        from scm.app.cli import _fail

        _fail(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2")
    return list(dict.fromkeys(int(v) for v in values))


def _default_grid(lo: float, hi: float, count: int = 8) -> list[float]:
    """`count` σ_rel spaced geometrically over [lo, hi], rounded to 3 significant digits."""
    import numpy as np

    return list(dict.fromkeys(min(max(float(f"{v:.3g}"), lo), hi) for v in np.geomspace(lo, hi, count)))


@ema_app.command("sweep")
def sweep(
    run: RUN_ARG,
    ref: Annotated[str, typer.Option(help="the reference, as for scm eval: a data set (mnist, a folder, …) or a "
                                          "reference-statistics .npz")],
    out: Annotated[str, typer.Option(help="a folder for sweep.json and sweep.png")],
    sigma_rels: Annotated[str | None, typer.Option(help="comma-separated σ_rel (default: 8 spaced geometrically "
                                                        "over the range the snapshots represent)")] = None,
    steps: Annotated[int | None, typer.Option(help="consistency runs: steps (default 1)")] = None,
    nfe: Annotated[int | None, typer.Option(help="diffusion runs: NFE (default 35, Heun)")] = None,
    solver: Annotated[str, typer.Option(help="diffusion runs: heun | euler")] = "heun",
    n: Annotated[int, typer.Option(help="samples per σ_rel and seed")] = 1000,
    seeds: Annotated[str, typer.Option(help="comma-separated sample seeds; several give a 95 % interval")] = "0",
    at_kimg: AT_KIMG = None,
    max_error: MAX_ERROR = 0.05,
    metric: Annotated[str, typer.Option(help="fd (classifier features) | fid (Inception, local weights)")] = "fd",
    inception: Annotated[str | None, typer.Option(help="FID Inception weights file")] = None,
    batch: Annotated[int, typer.Option(help="images per network call")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
):
    """Measure the quality (scm eval's metric) of RUN's EMA for a range of σ_rel, each reconstructed from the
    snapshots in memory: a table, the best σ_rel, DIR/sweep.json and DIR/sweep.png (needs matplotlib: the demo
    or dev extra of scm)."""
    from scm.app.cli import USER_ERRORS, _fail, _fail_on, writable_folder
    from scm.app.report import Report
    from scm.evaluate import evaluate_setting, open_checked_reference
    from scm.files import atomic_write
    from scm.generate import Sampler
    from scm.metrics import seed_interval
    from scm.train.distributed import resolve_device
    from scm.train.ema import plan_reconstruction, reconstructed_run

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    stds = _floats(sigma_rels, "--sigma-rels") if sigma_rels is not None else None
    seed_list = _ints(seeds, "--seeds")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        _fail(f"--device: {e}")
    folder = writable_folder(out, Path(out))
    plt = _pyplot(log)
    try:
        sampler = Sampler(steps=steps, nfe=nfe, solver=solver)
        if stds is None:  # spread over the range the snapshots represent
            span = plan_reconstruction(run, [], at_kimg=at_kimg, max_error=max_error).representable
            if span is None:
                _fail(f"{run}: its snapshots represent no σ_rel within --max-error {max_error:g}")
            stds = _default_grid(*span)
        rec = plan_reconstruction(run, stds, at_kimg=at_kimg, max_error=max_error)  # every σ_rel checked first
        first = reconstructed_run(rec, rec.stds[0], dev)
        space, stats = open_checked_reference(first, [sampler], ref, n, metric=metric, inception=inception, log=log)
        rows = []
        for s in rec.stds:
            loaded = first if s == rec.stds[0] else reconstructed_run(rec, s, dev)
            values = []
            for seed in seed_list:
                row, _ = evaluate_setting(loaded, sampler, space, stats, n, seed=seed, batch=batch)
                values.append(float(row[space.metric]))
            spread = seed_interval(values)
            mean, interval = spread.mean, (None if spread.low is None else [spread.low, spread.high])
            rows.append({"sigma_rel": s, space.metric: mean, "std": spread.std, "interval": interval, "values": values,
                         "profile_error": rec.errors[s]})
            log(f"σ_rel {s:g}: {space.metric} {mean:.3f}" + (f" (95 % interval {interval[0]:.3f}–{interval[1]:.3f})"
                                                             if interval else ""))
    except USER_ERRORS as e:
        _fail_on(e, {**EMA_FLAGS, "sigma_rel": "--sigma-rels"}, EMA_HINTS)

    m = space.metric
    finite = [r for r in rows if math.isfinite(r[m])]
    best = min(finite, key=lambda r: r[m]) if finite else None
    command = ["scm", "ema", "sweep", run, "--ref", ref, "--out", out, "--sigma-rels", ",".join(f"{s:g}" for s in
               rec.stds), "--seeds", ",".join(map(str, seed_list)), "--n", str(n), "--metric", metric,
               "--max-error", f"{max_error:g}", "--batch", str(batch)]
    for flag, value in (("--steps", steps), ("--nfe", nfe), ("--at-kimg", at_kimg)):
        if value is not None:
            command += [flag, f"{value:g}"]
    if nfe is not None:
        command += ["--solver", solver]
    result = {"run": str(run), "reference": stats.source, "metric": m, "sampler": sampler.describe(first), "n": n,
              "seeds": seed_list, "kimg": rec.cur_nimg / 1000, "step": rec.step, "snapshots": len(rec.snapshots),
              "profiles": list(rec.profiles), "representable": rec.representable, "max_error": rec.max_error,
              "rows": rows, "best": best and {"sigma_rel": best["sigma_rel"], m: best[m]},
              "command": " ".join(command)}
    atomic_write(folder / "sweep.json", json.dumps(result, indent=2) + "\n")
    header = ["σ_rel", m, *(["95 % interval"] if len(seed_list) > 1 else []), "profile error"]
    table = [[f"{r['sigma_rel']:g}", f"{r[m]:.3f}",
              *([f"{r['interval'][0]:.3f}–{r['interval'][1]:.3f}" if r["interval"] else "-"]
                if len(seed_list) > 1 else []), f"{r['profile_error']:.4f}"] for r in rows]
    print(Report("").table(header, table).to_markdown().split("\n", 2)[2], end="")
    if best is not None:
        print(f"best σ_rel: {best['sigma_rel']:g} ({m} {best[m]:.3f}; {result['sampler']}, {n} samples × "
              f"{len(seed_list)} seed(s), at {rec.cur_nimg / 1000:g} kimg)")
    written = [folder / "sweep.json"]
    if plt is not None:
        written.append(_plot(plt, rows, m, result, folder / "sweep.png"))
    print(f"wrote {' and '.join(map(str, written))}", file=sys.stderr)


def _pyplot(log):
    """matplotlib.pyplot (Agg), or None with a note: the sweep still writes its table and JSON."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no sweep.png (pip install 'scm[demo]' or 'scm[dev]')")
        return None
    return plt


def _plot(plt, rows: list[dict], metric: str, result: dict, path: Path) -> Path:
    import io

    from scm.files import atomic_write

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs, ys = [r["sigma_rel"] for r in rows], [r[metric] for r in rows]
    ax.plot(xs, ys, "o-", color="C0")
    for r in rows:
        if r["interval"]:
            ax.plot([r["sigma_rel"]] * 2, r["interval"], color="C0", alpha=0.5)
    if result["best"]:
        best = result["best"]["sigma_rel"]
        ax.axvline(best, color="C3", ls="--", lw=1, label=f"best σ_rel {best:g}")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("σ_rel (post-hoc EMA)")
    ax.set_ylabel(metric)
    ax.set_title(f"{Path(result['run']).name} at {result['kimg']:g} kimg: {result['sampler']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path
