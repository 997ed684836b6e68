"""`scm kernels tune`: measure the attention kernels' launch configurations on this card and write them to a table
that the kernels read (`scm.nets.attention_tuning`; then `export SCM_ATTENTION_TUNING=FILE`); `scm kernels show`:
what each kernel launches with here.

    scm kernels tune --out my-card.json [--dims 64 --dims 128] [--n 4096] [--batch 4] [--heads 16]
                     [--dtype bfloat16] [--budget-s S]
    scm kernels show [--dims 64 --dims 128] [--dtype bfloat16]      # what each kernel launches with here
"""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from scm.app.common import USER_ERRORS, fail, fail_on

__all__ = ["kernels_app"]

kernels_app = typer.Typer(no_args_is_help=True, help="The attention kernels' launch configurations on this card.")
DTYPES = ("bfloat16", "float16", "float32")


def _check(dims: list[int], dtype: str) -> None:
    if dtype not in DTYPES:
        fail(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if any(not 1 <= d <= 128 for d in dims):
        fail(f"--dims {dims}: head dims lie in 1..128")


@kernels_app.command("tune")
def tune(
    out: Annotated[str, typer.Option(help="the table file to write (merged into when it exists)")],
    dims: Annotated[list[int] | None, typer.Option(help="head dims to tune (repeatable; default 64 and 128)")] = None,
    n: Annotated[int, typer.Option(help="tokens of the self-attention timed")] = 4096,
    batch: Annotated[int, typer.Option(help="batch of the attention timed")] = 4,
    heads: Annotated[int, typer.Option(help="heads of the attention timed")] = 16,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32")] = "bfloat16",
    budget_s: Annotated[float | None, typer.Option(help="stop searching after this many seconds")] = None,
):
    """Time a search space of block shapes, warps and stages for each attention kernel and head dim on this card,
    and write the configurations that beat the default by more than 3 % (with outputs equal to the default's) to
    --out; the kernels use them once SCM_ATTENTION_TUNING names the file."""
    dims = dims or [64, 128]
    _check(dims, dtype)
    if min(n, batch, heads) < 1 or (budget_s is not None and budget_s <= 0):
        fail("--n, --batch, --heads and --budget-s must be > 0")
    import torch

    from scm.nets import attention_tuning as tuning

    if not torch.cuda.is_available():
        fail("tuning needs a CUDA card: the kernels' times elsewhere (Triton's interpreter) mean nothing")
    device = torch.device("cuda")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = tuning.tune(dims, n, batch, heads, getattr(torch, dtype), device, budget_s=budget_s, log=log)
    best, card = tuning.best_configs(results), tuning.card_name(device)
    measured = f"scm kernels tune, N = {n}, batch {batch}, {heads} heads, {time.strftime('%Y-%m-%d')}, torch " \
               f"{torch.__version__}"
    try:
        tuning.write_table(out, card, best, measured)
    except USER_ERRORS as e:
        fail_on(e, {"out": "--out"})
    for key, r in results.items():
        kept = "kept" if key in best else "the default stays"
        print(f"{key}: default {r['default_ms']:.4f} ms, fastest searched {r['best']} "
              f"{r['best_ms'] if r['best_ms'] is None else round(r['best_ms'], 4)} ms ({kept})")
    print(f"wrote {len(best)} configurations for {card} to {out}; use them with SCM_ATTENTION_TUNING={out}")


@kernels_app.command("show")
def show(
    dims: Annotated[list[int] | None, typer.Option(help="head dims (repeatable; default 64 and 128)")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float16 | float32")] = "bfloat16",
):
    """The launch configuration each attention kernel tries first on this card: its table entry (the packaged
    table, then SCM_ATTENTION_TUNING's), else the default list's first."""
    dims = dims or [64, 128]
    _check(dims, dtype)
    import os

    import torch

    from scm.nets import attention_triton as kernels
    from scm.nets import attention_tuning as tuning

    if not torch.cuda.is_available() and not kernels.interpreting():
        fail("no CUDA card here: the attention kernels run on CUDA (tests: in Triton's interpreter)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tuning.check_tables()
    except USER_ERRORS as e:
        fail_on(e)
    user = os.environ.get(tuning.ENV, "").strip()
    print(f"card: {tuning.card_name(device)}; tables: packaged {'yes' if tuning.PACKAGED.is_file() else 'none'}, "
          f"{tuning.ENV} {user or 'unset'}")
    for kernel in tuning.KERNELS:
        for d in dims:
            block = max(16, 1 << (d - 1).bit_length())
            config, source = kernels.first_choice(kernel, getattr(torch, dtype), block, block, device)
            print(f"{tuning.table_key(kernel, getattr(torch, dtype), block, block)}: BLOCK_M {config[0]}, BLOCK_N "
                  f"{config[1]}, {config[2]} warps, {config[3]} stages ({source})")
