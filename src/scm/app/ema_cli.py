"""`scm ema …`: post-hoc EMA (EDM2 §3.2, App. C.3) from the snapshots a run keeps (ema.snapshot_kimg).

    scm ema reconstruct RUN --sigma-rel 0.07 [--sigma-rel 0.15 …] --out OUT [--at-kimg K]
    scm ema sweep RUN --ref mnist [--sigma-rels 0.03,0.05,…] [--steps N | --nfe N] [--n N] [--seeds 0,1,2] --out DIR

`reconstruct` writes a run directory that `scm sample --ckpt OUT --ema S`, `scm eval`, `--teacher` and `--init`
read like any run; `sweep` measures each σ_rel (reconstructed in memory) with `scm eval`'s metric. The library
does the work (`scm.posthoc`); this module parses, prints, plots and words errors (`scm.app.common`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from scm.app.common import USER_ERRORS, device_of, fail, fail_on, writable_later
from scm.app.report import Report
from scm.defaults import MAX_ERROR, TEACHER_NFE
from scm.files import atomic_write, atomic_write_json

__all__ = ["ema_app"]

ema_app = typer.Typer(no_args_is_help=True, help="Post-hoc EMA (EDM2): any σ_rel from a run's EMA snapshots.")

# how the library's settings are spelled here (over scm.app.cli.FLAGS / HINTS)
EMA_FLAGS = {"sigma_rel": "--sigma-rel", "at_kimg": "--at-kimg", "max_error": "--max-error", "out": "--out",
             "ref": "--ref", "seeds": "--seeds"}
EMA_HINTS = {"out": "choose another --out",
             "run": "keep snapshots with ema.snapshot_kimg > 0 (the default) when training"}

RUN_ARG = Annotated[str, typer.Argument(help="a run directory trained with EMA snapshots (ema.snapshot_kimg)")]
AT_KIMG = Annotated[float | None, typer.Option(help="the training time to reconstruct at, in kimg (rounded to a "
                                                    "whole step; default: the last snapshot)")]
MAX_ERROR_OPTION = Annotated[float, typer.Option(help="the largest relative L² error of a σ_rel's reconstructed "
                                                      "averaging profile to accept (0.05: closer than a σ_rel 4–7 % "
                                                      "away)")]


@ema_app.command("reconstruct")
def reconstruct(
    run: RUN_ARG,
    sigma_rel: Annotated[list[float], typer.Option(help="σ_rel to reconstruct (repeatable; the first is the new "
                                                        "run's default EMA)")],
    out: Annotated[str, typer.Option(help="the run directory to create")],
    at_kimg: AT_KIMG = None,
    max_error: MAX_ERROR_OPTION = MAX_ERROR,
):
    """Reconstruct the power-function EMA of any σ_rel from RUN's snapshots into a new run directory OUT (RUN is
    only read)."""
    from scm.posthoc import plan_reconstruction, save_reconstruction

    try:
        rec = plan_reconstruction(run, sigma_rel, at_kimg=at_kimg, max_error=max_error)
        path = save_reconstruction(rec, out)
    except USER_ERRORS as e:
        fail_on(e, EMA_FLAGS, EMA_HINTS)
    for s in rec.stds:
        print(f"σ_rel {s:g}: {len(rec.snapshots)} snapshots × {len(rec.profiles)} profiles, relative L² error of the "
              f"profile {rec.errors[s]:.4f}")
    lo_hi = f"[{rec.representable[0]:g}, {rec.representable[1]:g}]" if rec.representable else "none"
    print(f"wrote {path} (at {rec.cur_nimg / 1000:g} kimg, step {rec.step}; σ_rel these snapshots represent within "
          f"{rec.max_error:g}: {lo_hi})", file=sys.stderr)


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.03,0.05,0.1")
    if not values:
        fail(f"{flag} {text!r}: give at least one value")
    return values


def _ints(text: str, flag: str) -> list[int]:
    values = _floats(text, flag)
    if not all(v.is_integer() for v in values):
        fail(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2")
    return list(dict.fromkeys(int(v) for v in values))


@ema_app.command("sweep")
def sweep(
    run: RUN_ARG,
    ref: Annotated[str, typer.Option(help="the reference, as for scm eval: a data set (mnist, a folder, …) or a "
                                          "reference-statistics .npz")],
    out: Annotated[str, typer.Option(help="a folder for sweep.json and sweep.png")],
    sigma_rels: Annotated[str | None, typer.Option(help="comma-separated σ_rel (default: 8 spaced geometrically "
                                                        "over the range the snapshots represent)")] = None,
    steps: Annotated[int | None, typer.Option(help="consistency runs: steps (default 1)")] = None,
    nfe: Annotated[int | None, typer.Option(help=f"diffusion runs: NFE (default {TEACHER_NFE}, Heun)")] = None,
    solver: Annotated[str, typer.Option(help="diffusion runs: heun | euler")] = "heun",
    n: Annotated[int, typer.Option(help="samples per σ_rel and seed")] = 1000,
    seeds: Annotated[str, typer.Option(help="comma-separated sample seeds; several give a 95 % interval")] = "0",
    at_kimg: AT_KIMG = None,
    max_error: MAX_ERROR_OPTION = MAX_ERROR,
    metric: Annotated[str, typer.Option(help="fd (classifier features) | fid (Inception, local weights)")] = "fd",
    inception: Annotated[str | None, typer.Option(help="FID Inception weights file")] = None,
    batch: Annotated[int, typer.Option(help="images per network call")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
):
    """Measure the quality (scm eval's metric) of RUN's EMA for a range of σ_rel, each reconstructed from the
    snapshots in memory: a table, the best σ_rel, DIR/sweep.json and DIR/sweep.png (needs matplotlib: the demo
    or dev extra of scm)."""
    from scm.generate import Sampler
    from scm.posthoc import sweep as sweep_sigma_rel

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    stds = _floats(sigma_rels, "--sigma-rels") if sigma_rels is not None else None
    seed_list = _ints(seeds, "--seeds")
    dev = device_of(device)
    folder = writable_later(out, Path(out))  # made only when there is something to write
    plt = _pyplot(log)
    try:
        result = sweep_sigma_rel(run, ref, Sampler(steps=steps, nfe=nfe, solver=solver), sigma_rels=stds, n=n,
                                 seeds=seed_list, at_kimg=at_kimg, max_error=max_error, metric=metric,
                                 inception=inception, batch=batch, device=dev, log=log)
    except USER_ERRORS as e:
        fail_on(e, {**EMA_FLAGS, "sigma_rel": "--sigma-rels"}, EMA_HINTS)
    result["command"] = _command(run, ref, out, result, max_error, batch, steps=steps, nfe=nfe, at_kimg=at_kimg,
                                 solver=solver)
    atomic_write_json(folder / "sweep.json", result)
    _print_table(result)
    written = [folder / "sweep.json"]
    if plt is not None:
        written.append(_plot(plt, result, folder / "sweep.png"))
    print(f"wrote {' and '.join(map(str, written))}", file=sys.stderr)


def _command(run, ref, out, result: dict, max_error, batch, *, steps, nfe, at_kimg, solver) -> str:
    """The `scm ema sweep` command that gives this result again (every choice spelled out)."""
    command = ["scm", "ema", "sweep", run, "--ref", ref, "--out", out, "--sigma-rels",
               ",".join(f"{r['sigma_rel']:g}" for r in result["rows"]), "--seeds", ",".join(map(str, result["seeds"])),
               "--n", str(result["n"]), "--metric", result["metric"], "--max-error", f"{max_error:g}", "--batch",
               str(batch)]
    for flag, value in (("--steps", steps), ("--nfe", nfe), ("--at-kimg", at_kimg)):
        if value is not None:
            command += [flag, f"{value:g}"]
    if nfe is not None:
        command += ["--solver", solver]
    return " ".join(command)


def _print_table(result: dict) -> None:
    m, rows, several = result["metric"], result["rows"], len(result["seeds"]) > 1
    header = ["σ_rel", m, *(["95 % interval"] if several else []), "profile error"]
    table = [[f"{r['sigma_rel']:g}", f"{r[m]:.3f}",
              *([f"{r['interval'][0]:.3f}–{r['interval'][1]:.3f}" if r["interval"] else "-"] if several else []),
              f"{r['profile_error']:.4f}"] for r in rows]
    print(Report("").table(header, table).to_markdown().split("\n", 2)[2], end="")
    best = result["best"]
    if best is not None:
        print(f"best σ_rel: {best['sigma_rel']:g} ({m} {best[m]:.3f}; {result['sampler']}, {result['n']} samples × "
              f"{len(result['seeds'])} seed(s), at {result['kimg']:g} kimg)")


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


def _plot(plt, result: dict, path: Path) -> Path:
    rows, metric = result["rows"], result["metric"]
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
