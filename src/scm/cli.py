"""The `scm` command: thin wrappers that parse arguments and call the library.

Errors the user can fix (missing files, bad values, a run directory of another kind, …) end with one line
`error: …` on stderr and a non-zero exit code: 2 for bad input, 3 when training stopped on non-finite
steps, 130 when interrupted (a checkpoint is saved; continue with --resume).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continuous-time consistency models (sCT / sCD): train, distill, sample, evaluate.")




def _user_errors() -> tuple[type[BaseException], ...]:
    from scm.config import ConfigError
    from scm.data import DataError
    from scm.train import RunError
    from scm.train.checkpoint import CheckpointError

    return (ConfigError, DataError, RunError, CheckpointError, FileNotFoundError)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
