"""The captured sampler against the eager one: `scm.generate.generate(..., captured=True)` (sampler and network as
one compiled graph: CUDA graphs on a GPU) vs eager, batch 1 and 64, 1 and 2 steps, random weights, under bf16
autocast on a GPU (fp32 on the CPU), with the largest difference between their images.

    python benchmarks/gpu_captured.py                         # a lent GPU: the XXL U-Net (64×64×4)
    python benchmarks/gpu_captured.py --net "dit-tiny-32-sct net_preset=DiT-XL/2 channels=4"   # DiT-XL/2, 32×32×4
    python benchmarks/gpu_captured.py --device cpu --net tiny-28-sct --batch 1 --batch 8 --repeats 2   # dry run

Writes <out>/captured-<device name>.{json,md} (default out: benchmarks/results/gpu on CUDA, /tmp elsewhere). Times are
per call of `generate` (network and sampler, `seconds` as generate reports them), median of --repeats after one
warm-up call (the captured sampler's compilation is in its warm-up and reported apart).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from scm.config import make_config
from scm.generate import Sampler, generate
from scm.nets.registry import build_net
from scm.runs import network_run

DEFAULT_NETS = ["img512-XXL-sct"]  # the paper's largest U-Net, on 64×64×4 latents


def loaded(spec: str, device: torch.device):
    """The network of a training preset, given as 'PRESET [KEY=VALUE …]', with random weights."""
    preset, *overrides = spec.split()
    cfg = make_config(preset, overrides=overrides)
    torch.manual_seed(0)
    net = build_net(cfg.net, cfg.loss.sigma_d)
    with torch.no_grad():
        for p in net.parameters():  # a fresh EDM2 network's output layer is zero: make every weight count
            if not p.any():
                p.normal_(0, 0.05)
    return network_run(cfg, net.state_dict(), source=Path(spec), ema_std=None, step=0, device=device)


def timed(run, batch: int, steps: int, captured: bool, repeats: int, half) -> tuple[float, float, torch.Tensor]:
    device_type = next(run.net.parameters()).device.type

    def call():
        with torch.autocast(device_type, dtype=half, enabled=half is not None):
            return generate(run, batch, Sampler(steps=steps), batch=batch, seed=1, progress=False,
                            captured=captured)

    start = time.perf_counter()
    images, _ = call()  # warm-up (the captured sampler compiles here)
    warmup = time.perf_counter() - start
    seconds = statistics.median(call()[1] for _ in range(repeats))
    return seconds, warmup, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--net", action="append",
                    help="a training preset whose network is sampled, with overrides: 'PRESET [KEY=VALUE …]'")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 64)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    half = torch.bfloat16 if device.type == "cuda" else None
    nets = args.net or DEFAULT_NETS
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out or ("benchmarks/results/gpu" if device.type == "cuda" else "/tmp"))
    result = {"device": name, "precision": "bf16 autocast" if half else "fp32", "torch": torch.__version__,
              "command": shlex.join(["python", *sys.argv]), "rows": []}
    for spec in nets:
        run = loaded(spec, device)
        for batch in args.batch or [1, 64]:
            for steps in (1, 2):
                eager_s, _, eager = timed(run, batch, steps, False, args.repeats, half)
                captured_s, compile_s, captured = timed(run, batch, steps, True, args.repeats, half)
                result["rows"].append({"net": spec, "batch": batch, "steps": steps, "eager_ms": 1000 * eager_s,
                                       "captured_ms": 1000 * captured_s, "speedup": eager_s / captured_s,
                                       "first_call_s": compile_s,
                                       "max_abs_diff": float((captured - eager).abs().max())})
                print(json.dumps(result["rows"][-1]), file=sys.stderr)
                written = write(out, result)  # after every row: a run stopped at its limit keeps what it measured
    print(written)


def write(out: Path, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"captured-{result['device'].replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Captured vs eager sampler on {result['device']} ({result['precision']})", "",
             f"`{result['command']}`", "",
             "| net | batch | steps | eager ms | captured ms | speed-up | first call s | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['net']} | {r['batch']} | {r['steps']} | {r['eager_ms']:.2f} | {r['captured_ms']:.2f} | "
              f"{r['speedup']:.2f}× | {r['first_call_s']:.1f} | {r['max_abs_diff']:.2e} |" for r in result["rows"]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()
