"""What limits 2-step sCD/sCT on MNIST? Small, recorded experiments: one change each against a baseline, every run
for the same wall-clock, all at once (one process per run; made for a GPU, where the tiny U-Net is launch-bound
and runs side by side cost little more than one; each process gets its share of the CPU threads), then each is
evaluated in this process, one setting after another, at 1 and 2 steps (t_mid = 1.1 and others) with several
sample seeds (the teacher too).

    python benchmarks/fidelity_sweep.py --device cuda --minutes 3 --n 2000 --seeds 0 1 2 [--only scd-base ...]
    python benchmarks/fidelity_sweep.py --eval-only ...   # evaluate the runs already trained in --work

Results: benchmarks/results/fidelity-sweep-<device>.{json,md} (machine, command, every row). The teacher is
demo/teacher (its Heun-35 quality is measured here with the same n and seeds, unguided).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from common import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "demo" / "teacher"
# name: (preset, overrides) — one change each against the baseline of its method
VARIANTS = {
    "scd-base": ("tiny-28-scd", []),
    "scd-lr3e-4": ("tiny-28-scd", ["optim.lr=3e-4"]),
    "scd-lr3e-3": ("tiny-28-scd", ["optim.lr=3e-3"]),
    "scd-batch512": ("tiny-28-scd", ["batch=512"]),
    "scd-P-0.8-1.6": ("tiny-28-scd", ["loss.P_mean=-0.8", "loss.P_std=1.6"]),
    "scd-no-label-dropout": ("tiny-28-scd", ["net.label_dropout=0"]),
    "scd-lr-decay-8": ("tiny-28-scd", ["optim.lr_decay_kimg=8"]),
    "scd-no-warmup": ("tiny-28-scd", ["loss.warmup_kimg=0"]),
    "sct-base": ("tiny-28-sct", []),
    "sct-lr3e-4": ("tiny-28-sct", ["optim.lr=3e-4"]),
    "sct-batch512": ("tiny-28-sct", ["batch=512"]),
    "sct-P-0.8-1.6": ("tiny-28-sct", ["loss.P_mean=-0.8", "loss.P_std=1.6"]),
}
T_MIDS = (0.8, 1.1, 1.3)


def log(msg: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _eval_rows(path, args, settings):
    """(label, Sampler, ema) settings → rows with the metric for each sample seed."""
    from scm.evaluate import evaluate_setting
    from scm.metrics import open_reference
    from scm.runs import load_run

    space, ref = open_reference("mnist", log=lambda *_: None)
    rows = []
    for label, sampler, ema in settings:
        run = load_run(path, ema, device=args.device)
        values = []
        for seed in args.seeds:
            row, _ = evaluate_setting(run, sampler, space, ref, args.n, seed=seed, batch=500)
            values.append(row[space.metric])
        rows.append({"setting": label, "ema": ema, "values": values, **_spread(values)})
    return rows


def _spread(values):
    """Mean and the 95 % t-interval's half-width over the sample seeds."""
    from scm.metrics import seed_interval

    spread = seed_interval(values)
    return {"mean": spread.mean, "pm": spread.half_width}


def train_variant(name, args):
    """Train one variant for args.minutes of wall-clock (in its own process)."""
    import torch

    from scm.config import make_config
    from scm.train import train

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.parallel))  # side by side: share the CPU cores
    preset, overrides = VARIANTS[name]
    out = Path(args.work) / name
    flag = {"teacher": str(TEACHER)} if preset.endswith("scd") else {"init": str(TEACHER)}
    base = ["progress=false", "tensorboard=false", "sample_every_kimg=None", "sample_count=16", "ckpt_every_kimg=1e6",
            f"max_minutes={args.minutes}", "log_every=20"]
    batch = next((int(o.split("=")[1]) for o in overrides if o.startswith("batch=")), args.batch)
    overrides = [o for o in overrides if not o.startswith("batch=")]
    cfg = make_config(preset, None, base + overrides, data="mnist", out=str(out), kimg=1e6, batch=batch,
                      device=args.device, **flag)
    t0 = time.perf_counter()
    train(cfg)
    return {"name": name, "preset": preset, "overrides": overrides, "batch": batch,
            "train_seconds": time.perf_counter() - t0}


def evaluate_variant(name, args, record):
    """1-step and 2-step (several t_mid) quality of a trained variant, both EMA lengths (in the main process)."""
    from scm.generate import Sampler
    from scm.sampling import consistency_times

    out = Path(args.work) / name
    state = json.loads(sorted((out / "checkpoints").glob("*/state.json"))[-1].read_text())
    settings = []
    for ema in args.emas:
        settings.append(("1-step", Sampler(steps=1), ema))
        for tm in T_MIDS:
            settings.append((f"2-step t_mid={tm}", Sampler(ts=tuple(consistency_times(2, t_mid=tm))), ema))
    rows = _eval_rows(out, args, settings)
    log(f"{name}: {state['kimg']:.1f} kimg; " + ", ".join(f"{r['setting']} σ={r['ema']}: {r['mean']:.1f}"
                                                       for r in rows))
    return {**record, "kimg": state["kimg"], "rows": rows}


def run_teacher(args):
    from scm.generate import Sampler

    rows = _eval_rows(TEACHER, args, [("heun 35 NFE", Sampler(nfe=35), None)])
    log(f"teacher: {rows[0]['mean']:.1f}")
    return {"name": "teacher", "rows": rows}


def _train_job(job):
    name, args = job
    try:
        return train_variant(name, args)
    except Exception as e:  # a failed variant is a result
        log(f"{name}: failed: {type(e).__name__}: {e}")
        return {"name": name, "error": f"{type(e).__name__}: {e}"}


def report(results, path_md):
    lines = [f"# What limits 2-step sCD/sCT on MNIST: one change at a time ({results['device']})", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}", "",
             f"FD-MNIST (lower is better), n = {results['n']} per sample seed, mean ± 95 % t-interval over seeds "
             f"{results['seeds']}; every run trained for {results['minutes']} min of wall-clock, all runs at once on "
             "one device (so each run's speed is shared).", ""]
    fmt = lambda r: f"{r['mean']:.1f} ± {r['pm']:.1f}" if r.get("pm") is not None else f"{r['mean']:.1f}"  # noqa: E731
    teacher = next((r for r in results["runs"] if r["name"] == "teacher" and "rows" in r), None)
    if teacher:
        lines += [f"Teacher (demo/teacher), Heun 35 NFE, unguided: **{fmt(teacher['rows'][0])}**", ""]
    lines += ["| run | kimg | EMA σ_rel | 1-step | 2-step t_mid=0.8 | 2-step t_mid=1.1 | 2-step t_mid=1.3 |",
              "|---|---|---|---|---|---|---|"]
    for res in results["runs"]:
        if "error" in res:
            lines.append(f"| {res['name']} | failed: {res['error']} | | | | | |")
            continue
        if res["name"] == "teacher":
            continue
        for ema in sorted({r["ema"] for r in res["rows"]}):
            cells = [fmt(r) for r in res["rows"] if r["ema"] == ema]
            lines.append(f"| {res['name']} {' '.join(res.get('overrides', []))} | {res['kimg']:.1f} | "
                         f"{ema} | " + " | ".join(cells) + " |")
    path_md.write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--emas", type=float, nargs="+", default=[0.05], help="EMA σ_rel to evaluate (tracked: 0.05, 0.1)")
    p.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    p.add_argument("--parallel", type=int, default=12, help="runs trained at once")
    p.add_argument("--eval-only", action="store_true", help="evaluate the runs already in --work")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "runs" / "fidelity-sweep"))
    p.add_argument("--out", default=None, help="result stem (default benchmarks/results/fidelity-sweep-<device>)")
    args = p.parse_args()
    names = args.only or list(VARIANTS)
    stem = Path(args.out) if args.out else RESULTS / f"fidelity-sweep-{args.device.split(':')[0]}"
    results = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "device": args.device,
               "minutes": args.minutes, "n": args.n, "seeds": args.seeds, "runs": []}
    if args.eval_only:
        records = [{"name": n} for n in names if (Path(args.work) / n / "checkpoints").is_dir()]
    else:  # training side by side; evaluation after it, one setting at a time, in this process
        with mp.get_context("spawn").Pool(min(args.parallel, len(names))) as pool:
            records = pool.map(_train_job, [(n, args) for n in names], chunksize=1)
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save():
        Path(f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
        report(results, Path(f"{stem}.md"))

    results["runs"].append(run_teacher(args))
    save()
    for record in records:
        results["runs"].append(record if "error" in record else evaluate_variant(record["name"], args, record))
        save()  # after every run, so that a stopped sweep keeps what it measured
    log(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
