"""What verifying a checkpoint on read costs: loading a run's EMA weights with every check (header, shapes, digest,
finite values: `scm.integrity.read_tensors`) against loading the same file with safetensors alone.

    python benchmarks/verify_cost.py [--preset cifar10-sct] [--repeats 5]

Writes benchmarks/results/verify_cost.{json,md}: the file's size, the median time of each way of loading it (the
file in the page cache, as after a first read), and the digest's throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from scm.config import make_config
from scm.integrity import read_tensors, write_tensors
from scm.nets.registry import build_net
from scm.runs import ema_key, weight_shapes

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10-sct")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = make_config(args.preset)
    net = build_net(cfg.net, cfg.loss.sigma_d)
    shapes = weight_shapes(net)
    tensors = {ema_key(s, k): v for s in cfg.ema.stds for k, v in net.state_dict().items() if k in shapes}
    expect = {k: tuple(v.shape) for k, v in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ema.safetensors"
        digest = write_tensors(tensors, path)
        size = path.stat().st_size

        def plain():
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (not iterable)

        plain()  # into the page cache
        t_plain = timed(plain, args.repeats)
        t_verified = timed(lambda: {k: v.clone() for k, v in read_tensors(path, record=digest, expect=expect).items()},
                           args.repeats)
    result = {"preset": args.preset, "parameters": sum(v.numel() for v in net.state_dict().values()),
              "ema_stds": list(cfg.ema.stds), "file_bytes": size, "plain_s": round(t_plain, 4),
              "verified_s": round(t_verified, 4), "extra_s_per_GB": round((t_verified - t_plain) / (size / 1e9), 3),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(["python", *sys.argv])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "verify_cost.md").write_text(
        "# Verifying a checkpoint on read\n\n"
        f"`{result['command']}` on {result['machine']}: the EMA file of `{args.preset}` ({len(cfg.ema.stds)} "
        f"σ_rel, {size / 1e9:.2f} GB, in the page cache), median of {args.repeats}.\n\n"
        "| load | seconds |\n|---|---|\n"
        f"| safetensors alone (tensors copied out) | {t_plain:.3f} |\n"
        f"| verified (header, shapes, SHA-256, finite values) | {t_verified:.3f} |\n\n"
        f"Verification adds {result['extra_s_per_GB']:.2f} s per GB read.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
