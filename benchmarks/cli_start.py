"""How fast the command line starts: `scm --help` and a subcommand's help against `python -c "import torch"`, in the
same run, each a fresh interpreter (median of --repeats).

    python benchmarks/cli_start.py [--repeats 7]

Writes benchmarks/results/cli_start.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    scm = shutil.which("scm") or str(Path(sys.executable).parent / "scm")
    cases = {"python -c pass": [sys.executable, "-c", "pass"],
             "python -c 'import torch'": [sys.executable, "-c", "import torch"],
             "python -c 'import scm'": [sys.executable, "-c", "import scm"],
             "scm --help": [scm, "--help"],
             "scm sample --help": [scm, "sample", "--help"],
             "scm data prepare --help": [scm, "data", "prepare", "--help"]}
    seconds = {name: median_seconds(cmd, args.repeats) for name, cmd in cases.items()}
    torch_s = seconds["python -c 'import torch'"]
    result = {"seconds": {k: round(v, 4) for k, v in seconds.items()},
              "help_speedup_vs_import_torch": round(torch_s / seconds["scm --help"], 2),
              "machine": f"{platform.machine()}, {platform.python_version()}", "repeats": args.repeats,
              "command": " ".join(["python", *sys.argv])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_start.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "".join(f"| `{k}` | {v:.3f} | {torch_s / v:.1f}× |\n" for k, v in seconds.items())
    (RESULTS / "cli_start.md").write_text(
        "# How fast the command line starts\n\n"
        f"`{result['command']}` ({result['machine']}; each a fresh process, median of {args.repeats}):\n\n"
        "| command | seconds | `import torch` ÷ this |\n|---|---|---|\n" + rows +
        "\nNo help, and no error about an argument that is wrong on its face, imports torch (or numpy): "
        "`tests/test_structure.py::test_the_command_line_and_its_help_start_without_torch`.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
