"""The captured sampler against the eager one: `scm.generate.generate(..., captured=True)` (sampler and network as
one compiled graph: CUDA graphs on a GPU) vs eager, batch 1 and 64, 1 and 2 steps, random weights, under bf16
autocast on a GPU (fp32 on the CPU), with the largest difference between their images. On a GPU also the other way
to capture: the same steps recorded by `torch.cuda.CUDAGraph` directly (no compiler, eager's own kernels replayed),
from the same noise, with its difference from eager (zero if it replays the same kernels).

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

from scm._rng import randn
from scm.conditioning import Conditioning
from scm.config import make_config
from scm.generate import Sampler, generate, image_generators
from scm.nets.registry import build_net
from scm.runs import network_run
from scm.sampling import consistency_steps, renoise_draws

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


def direct_graph(run, batch: int, steps: int, repeats: int, half) -> tuple[float, torch.Tensor]:
    """`consistency_steps` recorded once by torch.cuda.CUDAGraph (after a warm-up on a side stream, autocast's cache
    off as capture requires) on the inputs `generate` draws for seed 1, then replayed: the median seconds of a replay
    and its samples."""
    device = next(run.net.parameters()).device
    cfg, sd = run.cfg, run.cfg.loss.sigma_d
    ts = Sampler(steps=steps).times(run)
    gens = image_generators(1, 0, batch, device)
    noise = sd * randn((batch, *cfg.shape), gens, device=device)
    renoise = renoise_draws(noise, len(ts) - 1, sd, gens)
    cond = Conditioning.of_run(cfg).sample_inputs(torch.arange(batch, device=device))

    def sample():
        with torch.autocast("cuda", dtype=half, enabled=half is not None, cache_enabled=False):
            return consistency_steps(run.net, noise, renoise, ts, sd, **cond)

    with torch.no_grad():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                sample()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sample()
        seconds = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out.float().cpu()


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
                row = {"net": spec, "batch": batch, "steps": steps, "eager_ms": 1000 * eager_s,
                       "captured_ms": 1000 * captured_s, "speedup": eager_s / captured_s, "first_call_s": compile_s,
                       "max_abs_diff": float((captured - eager).abs().max())}
                if device.type == "cuda":
                    try:
                        graph_s, direct = direct_graph(run, batch, steps, args.repeats, half)
                        row |= {"cuda_graph_ms": 1000 * graph_s,
                                "cuda_graph_max_abs_diff": float((direct - eager.float()).abs().max())}
                    except Exception as e:  # recorded; the row's other figures stand
                        row["cuda_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                result["rows"].append(row)
                print(json.dumps(result["rows"][-1]), file=sys.stderr)
                written = write(out, result)  # after every row: a run stopped at its limit keeps what it measured
    print(written)


def direct_cells(r: dict) -> str:
    if "cuda_graph_ms" in r:
        return f"{r['cuda_graph_ms']:.2f} | {r['cuda_graph_max_abs_diff']:.2e}"
    return f"{r.get('cuda_graph_error', '–')} | –"


def write(out: Path, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"captured-{result['device'].replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Captured vs eager sampler on {result['device']} ({result['precision']})", "",
             f"`{result['command']}`", "",
             "| net | batch | steps | eager ms | captured ms | speed-up | first call s | max abs diff | CUDA graph "
             "(direct) ms | its max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['net']} | {r['batch']} | {r['steps']} | {r['eager_ms']:.2f} | {r['captured_ms']:.2f} | "
              f"{r['speedup']:.2f}× | {r['first_call_s']:.1f} | {r['max_abs_diff']:.2e} | {direct_cells(r)} |"
              for r in result["rows"]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()
