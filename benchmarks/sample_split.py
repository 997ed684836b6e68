"""Where the time of `scm sample` goes on the CPU: start-up (interpreter, the command line, importing torch and the
sampling modules), loading (reading and verifying the checkpoint, building the network), sampling (`generate`) and
writing the PNG, for N images in K steps.

    python benchmarks/sample_split.py --ckpt RUN [--n 64] [--steps 2] [--repeats 5] [--captured]

Each repeat is a fresh process running `scm sample` unchanged, with timers around `scm.runs.load_run`,
`scm.generate.generate` and `scm.images.save_png` installed before the command starts; start-up is the rest of the
process's wall time. Writes benchmarks/results/sample_split.{json,md} (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# The command unchanged, with timers around the three functions it calls; importing their modules first changes
# nothing (the command imports them anyway, and that time is start-up either way).
DRIVER = """
import json, sys, time
import scm.generate, scm.images, scm.runs

timers = {}

def wrap(module, name, key):
    original = getattr(module, name)
    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            timers[key] = timers.get(key, 0.0) + time.perf_counter() - start
    setattr(module, name, timed)

wrap(scm.runs, "load_run", "loading")
wrap(scm.generate, "generate", "sampling")
wrap(scm.images, "save_png", "writing")
from scm.app.cli import app
try:
    app(sys.argv[1:], prog_name="scm")
except SystemExit as e:
    assert not e.code, e.code
print("TIMERS", json.dumps(timers))
"""


def run_once(args, out: Path) -> dict:
    command = [sys.executable, "-c", DRIVER, "sample", "--ckpt", args.ckpt, "--n", str(args.n), "--steps",
               str(args.steps), "--out", str(out / "grid.png"), "--device", "cpu",
               *(["--captured"] if args.captured else [])]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    total = time.perf_counter() - start
    timers = json.loads(proc.stdout.split("TIMERS ", 1)[1])
    return {"total": total, **timers, "start-up": total - sum(timers.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--captured", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(args, Path(tmp)) for _ in range(args.repeats)]
    keys = ["start-up", "loading", "sampling", "writing", "total"]
    median = {k: round(statistics.median(r[k] for r in runs), 4) for k in keys}
    imports = subprocess.run([sys.executable, "-c", "import time; s = time.perf_counter(); import torch; "
                              "print(time.perf_counter() - s)"], capture_output=True, text=True, check=True)
    median["of which import torch"] = round(float(imports.stdout), 4)
    result = {"command": " ".join(["python", *sys.argv]), "n": args.n, "steps": args.steps, "seconds": median}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sample_split.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "".join(f"| {k} | {v:.3f} |\n" for k, v in median.items())
    (RESULTS / "sample_split.md").write_text(
        f"# Where the time of `scm sample` goes (CPU, {args.n} images, {args.steps} steps)\n\n"
        f"`{result['command']}`, median of {args.repeats} fresh processes:\n\n| part | seconds |\n|---|---|\n" + rows)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
