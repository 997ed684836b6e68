"""Sampling time per image: 1- and 2-step consistency sampling vs the teacher's Heun ODE sampler, same net.

    python benchmarks/sampling_speed.py --device cuda [--net XXL:64:4] [--net DiT-XL/2:32:4] [--batch 1 --batch 64]
                                        [--precision bf16] [--heun-steps 18] [--repeats 10]

Video and audio presets work too (`--net video-S:64:1`: clips of the preset's frames; `--net audio-B:32:1`:
16,000-sample waveforms; the resolution is not used). Each net is a preset with random weights (`common.awake`),
class-conditional (1000 classes) with the guidance input, as the paper's ImageNet models. It times the denoiser
only (no VAE decoding): `consistency_sample` at 1 and 2 steps (t_max, t_mid = 1.1) and `ode_sample` with Heun at
`--heun-steps` EDM times (18 → 35 network evaluations, the paper's teacher setting), at each batch, under the
precision's autocast, in no-grad mode. The speed-up is the Heun time over the 2-step time on the same card. Writes
benchmarks/results/<--name>.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import awake, machine, sync, write_results

from scm.app.report import Report
from scm.nets import NET_PRESETS, build_net, net_config
from scm.precision import PRECISIONS
from scm.sampling import consistency_sample, consistency_times, ode_sample, ode_times

SIGMA_D = 0.5


def parse_net(spec: str) -> tuple[str, int, int]:
    """'PRESET:RESOLUTION:CHANNELS' → (preset, resolution, channels)."""
    try:
        preset, res, ch = spec.rsplit(":", 2)
        res, ch = int(res), int(ch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--net {spec!r}: expected PRESET:RESOLUTION:CHANNELS") from None
    if preset not in NET_PRESETS:
        raise argparse.ArgumentTypeError(f"--net {spec!r}: unknown preset (one of {', '.join(NET_PRESETS)})")
    return preset, res, ch


def seconds_per_call(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--net", type=parse_net, action="append", help="PRESET:RESOLUTION:CHANNELS (repeatable)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1 and 64)")
    ap.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    ap.add_argument("--heun-steps", type=int, default=18, help="EDM time steps of the Heun sampler (2N − 1 NFE)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls of the consistency samplers")
    ap.add_argument("--heun-repeats", type=int, default=2, help="timed calls of the Heun sampler")
    ap.add_argument("--name", default=None, help="result file stem (default sampling_speed-<device>)")
    args = ap.parse_args()
    nets = args.net or [parse_net("XXL:64:4"), parse_net("DiT-XL/2:32:4")]
    batches = args.batch or [1, 64]
    device = torch.device(args.device)
    half = PRECISIONS[args.precision] if args.precision != "fp32" else None
    nfe = 2 * args.heun_steps - 1
    samplers = {
        "1-step": lambda net, noise, cond: consistency_sample(net, noise, consistency_times(1), SIGMA_D, **cond),
        "2-step": lambda net, noise, cond: consistency_sample(net, noise, consistency_times(2), SIGMA_D, **cond),
        f"Heun {nfe} NFE": lambda net, noise, cond: ode_sample(net, noise, ode_times(args.heun_steps), SIGMA_D,
                                                               solver="heun", **cond),
    }
    results = []
    for preset, res, ch in nets:
        torch.manual_seed(0)
        with torch.device(device):
            net = awake(build_net(net_config(preset, img_resolution=res, img_channels=ch, label_dim=1000,
                                             guidance_embed=True), SIGMA_D)).eval()
        for batch in batches:
            noise = SIGMA_D * torch.randn(batch, *net.shape, device=device)  # images, clips (frames: the preset's)
            cond = {"labels": torch.randint(0, 1000, (batch,), device=device), "guidance": 1.3}
            row = {"net": preset, "shape": list(net.shape), "params": net.num_parameters(), "batch": batch}
            for name, sample in samplers.items():
                reps = args.heun_repeats if name.startswith("Heun") else args.repeats

                def call(sample=sample, net=net, noise=noise, cond=cond):
                    with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=half is not None):
                        sample(net, noise, cond)

                per_call = seconds_per_call(call, device, reps)
                row[name] = {"seconds_per_call": per_call, "ms_per_image": per_call / batch * 1e3}
                print(f"{preset} {'×'.join(map(str, net.shape))}, batch {batch}, {name}: {per_call * 1e3:.1f} ms "
                      f"per call, {per_call / batch * 1e3:.2f} ms per item", flush=True)
            row["heun_over_2step"] = row[f"Heun {nfe} NFE"]["seconds_per_call"] / row["2-step"]["seconds_per_call"]
            results.append(row)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()

    payload = {"device": str(device), "precision": args.precision, "heun_nfe": nfe,
               "note": "denoiser only (no VAE decoding), random weights, class labels + guidance input",
               "rows": results}
    report = Report(f"Sampling time per image: sCM 1/2 steps vs Heun {nfe} NFE ({args.precision}, {device})")
    report.table(["net", "params", "shape", "batch", "1-step ms/img", "2-step ms/img", f"Heun-{nfe} ms/img",
                  "Heun / 2-step"],
                 [[r["net"], f"{r['params'] / 1e6:.0f}M", "×".join(map(str, r["shape"][::-1])), r["batch"],
                   f"{r['1-step']['ms_per_image']:.2f}", f"{r['2-step']['ms_per_image']:.2f}",
                   f"{r[f'Heun {nfe} NFE']['ms_per_image']:.2f}", f"{r['heun_over_2step']:.1f}×"] for r in results])
    report.text("Denoiser only: no VAE decoding (none is in the tree yet). Random weights do not change the cost. "
                "The paper quotes 0.11 s per image for its 1.5B model on an A100, about 50× faster than diffusion.")
    name = args.name or f"sampling_speed-{device.type}"
    print(report.to_markdown())
    json_path, md_path = write_results(name, payload, report)
    print(f"wrote {json_path} and {md_path} ({machine().get('gpu', machine()['cpu'])})")


if __name__ == "__main__":
    main()
