"""Launch configurations of the attention kernels, per card: the table the kernels read, and the search that fills it.

Each Triton kernel of `scm.nets.attention_triton` runs one program per block of BLOCK_M queries (or BLOCK_N keys)
streaming over the other axis in blocks, with `num_warps` warps and `num_stages` pipeline stages. Which choice is
fastest depends on the kernel, the head dim, the dtype and the card; a wrong one can cost several times the time
(the fused tangent kernel at head dim 128 keeps three accumulators and spills registers where a block is too large).
Without an entry here a kernel takes the first of a short list that compiles on sm_90 without spills
(`attention_triton._CANDIDATES`), falling back down the list on cards with less shared memory.

A table is JSON:

    {"format": 1, "cards": {CARD: {"measured": "what, when, with which versions",
                                   "configs": {KEY: [BLOCK_M, BLOCK_N, num_warps, num_stages], …}}}}

CARD is `torch.cuda.get_device_name()` ("cpu (Triton interpreter)" under TRITON_INTERPRET=1) and KEY
"<kernel>/<dtype>/d<BLOCK_D>x<BLOCK_DV>" (`table_key`): one of KERNELS, the torch dtype's name, and the padded head
dims of queries/keys and of values (72 → 128). The kernels read the packaged table (`attention_tuning.json` beside
this file: cards this project measured with `benchmarks/kernel_tune.py`), then the file named by the environment
variable SCM_ATTENTION_TUNING, whose entries win: `tune` your own card and `write_table` the `best_configs` (the
command line: `scm kernels tune`).

A table entry is tried first; a launch that runs out of shared memory still falls back down the default list.
Every configuration is checked where the file is read (a bad one is an error naming the file and key), and the
search keeps a configuration only when its outputs equal the default configuration's to the dtype's rounding.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scm.errors import ConfigError

__all__ = ["ENV", "KERNELS", "SEARCH_SPACE", "best_configs", "card_name", "check_config", "check_tables", "forced",
           "forcing", "read_table", "reload", "search", "table_key", "tune", "tuned", "write_table"]

ENV = "SCM_ATTENTION_TUNING"
PACKAGED = importlib.resources.files("scm.nets").joinpath("attention_tuning.json")  # package data, once measured
INTERPRETER = "cpu (Triton interpreter)"
# fwd: O and the log-sum-exp (training's forward); fwd_tangent: the same pass with the tangent tO (the fused JVP);
# tangent: tO from a saved O and lse; dkdv, dq: the two FlashAttention-2 backward kernels.
KERNELS = ("fwd", "fwd_tangent", "tangent", "dkdv", "dq")
Config = tuple[int, int, int, int]   # (BLOCK_M, BLOCK_N, num_warps, num_stages)
# What the search tries: every block shape up to 128 × 64 logits per program first (4 warps, 1 stage), then the
# other warps and stages of the fastest two shapes (`search`).
BLOCK_SHAPES = ((128, 64), (64, 128), (128, 32), (64, 64), (64, 32), (32, 128), (32, 64), (32, 32))
SEARCH_SPACE = tuple((m, n, w, s) for m, n in BLOCK_SHAPES for w in (4, 8) for s in (1, 2, 3))


def table_key(kernel: str, dtype: torch.dtype, block_d: int, block_dv: int) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: one of {KERNELS}")
    return f"{kernel}/{str(dtype).removeprefix('torch.')}/d{block_d}x{block_dv}"


def card_name(device: torch.device) -> str | None:
    """The table's name of the card `device` is (None: not a card the kernels run on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from scm.nets.attention_triton import interpreting

    return INTERPRETER if interpreting() else None


def check_config(value, where: str) -> Config:
    """`value` as a Config, or a ConfigError naming `where` (the file and key)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ok:
        m, n, w, s = value
        ok = all(16 <= b <= 256 and b & (b - 1) == 0 for b in (m, n)) and w in (1, 2, 4, 8, 16) and 1 <= s <= 8
    if not ok:
        raise ConfigError(f"{where}: {value!r} is not [BLOCK_M, BLOCK_N, num_warps, num_stages] (blocks powers of "
                          "two from 16 to 256, warps 1/2/4/8/16, stages 1–8)")
    return tuple(value)


def read_table(path: str | Path) -> dict[str, dict[str, Config]]:
    """{card: {key: Config}} from a table file, checked (module docstring); a missing or malformed file, or a bad
    entry, is a ConfigError naming the file (and the card and key)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such attention tuning table") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON attention tuning table ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != 1 or not isinstance(raw.get("cards"), dict):
        raise ConfigError(f"{path}: not an attention tuning table (want {{\"format\": 1, \"cards\": {{…}}}})")
    out = {}
    for card, entry in raw["cards"].items():
        configs = entry.get("configs") if isinstance(entry, dict) else None
        if not isinstance(configs, dict):
            raise ConfigError(f"{path}: card {card!r} has no \"configs\" object")
        for key in configs:
            kernel = key.split("/", 1)[0]
            if kernel not in KERNELS or key.count("/") != 2:
                raise ConfigError(f"{path}: card {card!r}, key {key!r}: want <kernel>/<dtype>/d<D>x<DV>, kernel one "
                                  f"of {KERNELS}")
        out[card] = {key: check_config(v, f"{path}: card {card!r}, key {key!r}") for key, v in configs.items()}
    return out


@functools.lru_cache(maxsize=1)
def _tables() -> dict[str, dict[str, Config]]:
    """The packaged table, then SCM_ATTENTION_TUNING's entries over it (read once; `reload` reads them again)."""
    merged: dict[str, dict[str, Config]] = {}
    user = os.environ.get(ENV, "").strip()
    tables = []
    if PACKAGED.is_file():
        with importlib.resources.as_file(PACKAGED) as path:
            tables.append(read_table(path))
    if user:
        tables.append(read_table(user))
    for table in tables:
        for card, configs in table.items():
            merged.setdefault(card, {}).update(configs)
    return merged


def check_tables() -> None:
    """Read the tables now (the packaged one and SCM_ATTENTION_TUNING's), so that a malformed one is an error where a
    command starts rather than at the first kernel launch."""
    _tables()


def reload() -> None:
    """Read the tables again at the next launch (after SCM_ATTENTION_TUNING or a table file changed)."""
    _tables.cache_clear()
    tuned.cache_clear()


@functools.lru_cache(maxsize=256)
def tuned(kernel: str, dtype: torch.dtype, block_d: int, block_dv: int, device: torch.device) -> Config | None:
    """The table's configuration for this kernel on this card, or None."""
    card = card_name(device)
    return None if card is None else _tables().get(card, {}).get(table_key(kernel, dtype, block_d, block_dv))


def write_table(path: str | Path, card: str, configs: dict[str, Config], measured: str) -> Path:
    """Merge `configs` into the card's entry of the table at `path` (created if absent), written atomically."""
    from scm.files import atomic_write_json

    path = Path(path)
    raw = {"format": 1, "cards": {}}
    if path.is_file():
        read_table(path)  # refuses to extend a malformed table
        raw = json.loads(path.read_text())
    entry = raw["cards"].setdefault(card, {"configs": {}})
    entry["configs"] = dict(sorted({**entry.get("configs", {}), **{k: list(v) for k, v in configs.items()}}.items()))
    entry["measured"] = measured
    return atomic_write_json(path, raw)


# -- the search -----------------------------------------------------------------------------------------------------
_FORCED: dict[str, Config] = {}


class forcing:
    """Within it, `kernel` launches with `config` only: no table, no fallback (an error propagates)."""

    def __init__(self, kernel: str, config: Config):
        self.kernel, self.config = kernel, config

    def __enter__(self):
        _FORCED[self.kernel] = self.config

    def __exit__(self, *exc):
        _FORCED.pop(self.kernel, None)


def forced(kernel: str) -> Config | None:
    return _FORCED.get(kernel)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 2.0**-20)


def _same(outs, ref, dtype: torch.dtype) -> float | None:
    """The largest difference of outs from ref relative to ref's largest value, or None when it is within 8 units of
    roundoff: another tiling sums the same float32 products in another order and rounds the result once to the
    dtype, which moves outputs by a few units; a wrong tile moves them by O(1). (fp32 kernels: 2⁻²⁰ per unit, the
    reordered float32 sums over a few thousand keys.)"""
    worst = 0.0
    for a, b in zip(outs, ref, strict=True):
        finite = torch.isfinite(b)
        scale = max(b[finite].abs().max().item(), 1e-6) if finite.any() else 1.0
        if not torch.equal(torch.isfinite(a), finite):
            return float("inf")
        worst = max(worst, ((a - b)[finite].abs().max().item() if finite.any() else 0.0) / scale)
    return None if worst <= 8 * _unit_roundoff(dtype) else worst


def _time_ms(fn: Callable, device: torch.device) -> float:
    """The median time of fn in ms (CUDA: triton.testing.do_bench, compiled and warm; on the CPU one timed call, for
    the interpreter's dry runs only)."""
    fn()
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def search(kernel: str, run: Callable, device: torch.device, dtype: torch.dtype, space=SEARCH_SPACE,
           deadline: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Time `run` (the kernel(s) launched as now) with `kernel` forced to each configuration of `space`: the block
    shapes at their first warps/stages first, then every warps/stages of the fastest two shapes. Each must give the
    default configuration's outputs (`_same`). Stops at `deadline` (time.monotonic()). Returns {"default_ms",
    "tried": [[config, ms or why not]], "best": config or None, "best_ms"}."""
    ref = [o.detach().clone() for o in _as_tuple(run())]
    out = {"default_ms": round(_time_ms(run, device), 4), "tried": [], "best": None, "best_ms": None}
    shapes = list(dict.fromkeys(c[:2] for c in space))
    first = [next(c for c in space if c[:2] == s) for s in shapes]

    def attempt(config):
        if deadline is not None and time.monotonic() > deadline:
            return None
        try:
            with forcing(kernel, config):
                err = _same(_as_tuple(run()), ref, dtype)
                ms = _time_ms(run, device) if err is None else f"differs from the default by {err:.2g} (relative)"
        except Exception as e:  # out of shared memory or registers, a compile failure: this config is out
            ms = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        out["tried"].append([list(config), round(ms, 4) if isinstance(ms, float) else ms])
        log(f"  {kernel} {config}: {ms if isinstance(ms, str) else f'{ms:.4f} ms'}")
        return ms if isinstance(ms, float) else None

    timed = {c: ms for c in first if (ms := attempt(c)) is not None}
    top = sorted(timed, key=timed.get)[:2]
    for config in [c for c in space if c[:2] in {t[:2] for t in top} and c not in timed]:
        if (ms := attempt(config)) is not None:
            timed[config] = ms
    if timed:
        out["best"] = list(best := min(timed, key=timed.get))
        out["best_ms"] = round(timed[best], 4)
    return out


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _run(kernel: str, batch: int, heads: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> Callable:
    """A call of the kernel on random self-attention inputs [batch, heads, n, d] whose outputs `search` compares. For
    dkdv and dq it is the whole backward (both kernels, the other one at its default), so their times and the 3 %
    margin of `best_configs` are the backward's."""
    from scm.nets import attention_triton as kernels

    g = torch.Generator().manual_seed(0)
    q, k, v, tq, tk, tv, d_o = (torch.randn(batch, heads, n, d, generator=g).to(device, dtype) for _ in range(7))
    scale = d**-0.5
    if kernel == "fwd":
        return lambda: kernels.attention_forward(q, k, v, scale=scale)[::2]
    if kernel == "fwd_tangent":
        return lambda: kernels.attention_forward(q, k, v, tq, tk, tv, scale=scale)
    o, _, lse = kernels.attention_forward(q, k, v, scale=scale)
    if kernel == "tangent":
        return lambda: kernels.attention_tangent(q, k, v, o, lse, tq, tk, tv, scale=scale)
    return lambda: kernels.attention_backward(q, k, v, o, lse, d_o, scale=scale)


def tune(dims=(64, 128), n: int = 4096, batch: int = 4, heads: int = 16, dtype: torch.dtype = torch.bfloat16,
         device: torch.device | None = None, kernels=("fwd_tangent", "fwd", "tangent", "dkdv", "dq"),
         space=SEARCH_SPACE, budget_s: float | None = None, log: Callable[[str], None] = print) -> dict:
    """`search` for each kernel (in the order given: what matters most first) and head dim, on self-attention of n
    tokens. Returns {table key: {"d", **search's result}}; stops at budget_s seconds (what was not reached is
    absent)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    results = {}
    for kernel in kernels:
        for d in dims:
            if deadline is not None and time.monotonic() > deadline:
                return results
            block = max(16, 1 << (d - 1).bit_length())
            key = table_key(kernel, dtype, block, block)
            log(f"{key}: N = {n}, batch {batch}, {heads} heads")
            run = _run(kernel, batch, heads, n, d, dtype, device)
            results[key] = {"d": d, **search(kernel, run, device, dtype, space, deadline, log)}
    return results


def best_configs(results: dict, margin: float = 0.97) -> dict[str, Config]:
    """{key: the fastest configuration} of `tune`'s results where it beats the default by more than timing noise
    (faster than `margin` × the default's time: do_bench's medians of one kernel vary by 1–2 % between calls)."""
    return {key: tuple(r["best"]) for key, r in results.items()
            if r.get("best") and r["best_ms"] < margin * r["default_ms"]}
