"""Cost of latent space on this machine: encoding and decoding with a small VAE, and a training step on latents
vs on pixels for the same network preset.

    python benchmarks/latent_cost.py [--batch 64] [--repeats 5] [--device cpu|cuda]

The VAE is the tests' small random AutoencoderKL (channels 16, 32; one ResNet layer per block; 4 latent
channels; /2): its throughput says what `scm data encode` and the decoding in `scm sample` cost per image at
32×32 and 64×64 for a VAE of that size, not SD's (channels 128…512, /8). The training steps are
`step_cost.make_step`'s (objective, backward, Adam) with the `tiny` U-Net on 16×16×4 latents (32×32 images
through that VAE) and on 32×32×3 pixels, timed round-robin. Writes benchmarks/results/latent_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import torch
from common import machine, time_interleaved, write_results
from step_cost import make_step

from scm.app.report import Report


def small_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=32).eval().requires_grad_(False)


def vae_rows(args, device) -> dict:
    vae = small_vae().to(device)
    fns, sizes = {}, {}
    for res in (32, 64):
        x = torch.rand(args.batch, 3, res, res, device=device) * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        sizes[f"encode {res}×{res}"] = sizes[f"decode {res}×{res}"] = (res, tuple(z.shape[1:]))
        fns[f"encode {res}×{res}"] = torch.no_grad()(lambda x=x: vae.encode(x).latent_dist.mean)
        fns[f"decode {res}×{res}"] = torch.no_grad()(lambda z=z: vae.decode(z).sample)
    rows = time_interleaved(fns, device, args.repeats, warmup=1)
    for name, r in rows.items():
        r["img_per_s"] = args.batch / (r["median_ms"] / 1000)
        r["image"], r["latent"] = sizes[name][0], list(sizes[name][1])
    return rows


def step_rows(args, device) -> dict:
    spaces = {"latent 16×16×4": (16, 4), "pixel 32×32×3": (32, 3)}
    fns = {}
    for space, (res, channels) in spaces.items():
        a = SimpleNamespace(net="tiny", res=res, channels=channels, batch=args.batch, precision="fp32")
        for variant in ("diffusion", "sCT, fused pass"):
            fns[f"{variant.split(',')[0]}, {space}"] = make_step(variant, a, device)
    rows = time_interleaved(fns, device, args.repeats, warmup=1)
    for name, r in rows.items():
        r["img_per_s"] = args.batch / (r["median_ms"] / 1000)
        pixel = rows[name.replace("latent 16×16×4", "pixel 32×32×3")]["median_ms"]
        r["ratio_to_pixel"] = r["median_ms"] / pixel
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]  # other work on the machine distorts CPU timings (OpenMP threads wait)
    vae, steps = vae_rows(args, device), step_rows(args, device)
    payload = {"batch": args.batch, "device": str(device), "vae": "random AutoencoderKL, channels (16, 32), "
               "layers_per_block 1, 4 latent channels, /2", "net": "tiny", "load_average_before": load_before,
               "vae_timings": vae, "step_timings": steps}
    report = Report(f"Latent space: VAE throughput and training steps on latents vs pixels (batch {args.batch}, "
                    f"{device})")
    report.table(["VAE pass (small VAE)", "latent", "median ms", "min ms", "images / s"],
                 [[name, "×".join(map(str, r["latent"])), f"{r['median_ms']:.0f}", f"{r['min_ms']:.0f}",
                   f"{r['img_per_s']:.0f}"] for name, r in vae.items()])
    report.table(["training step (`tiny` U-Net)", "median ms", "min ms", "images / s", "× the pixel step"],
                 [[name, f"{r['median_ms']:.0f}", f"{r['min_ms']:.0f}", f"{r['img_per_s']:.1f}",
                   f"{r['ratio_to_pixel']:.2f}"] for name, r in steps.items()])
    report.markdown_text(NOTES)
    print(report.to_markdown())
    json_path, md_path = write_results("latent_cost", payload, report)
    print(f"wrote {json_path} and {md_path} ({machine()['cpu']})")


NOTES = """## Notes

- Encoding is paid once per data set (`scm data encode`; with `--normalization measure` the raw latents also go
  through a float32 scratch file, an I/O pass, not a second encoder pass); decoding is paid per generated image
  (`scm sample`, `scm eval`, training's sample grids) and is not counted in their images-per-second figures.
- A step on 16×16×4 latents processes 4× fewer positions than one on 32×32×3 pixels with the same U-Net (the
  preset's widths, levels at 16/8/4 instead of 32/16/8), so about 4× less work; fixed per-call costs make the
  measured ratio somewhat larger than 0.25.
- Timings are round-robin medians (`common.time_interleaved`); other work on the machine distorts CPU timings
  badly (PyTorch's OpenMP threads wait on each other), so the JSON records the load average before the run.
- SD's VAE (sd-vae-ft-mse, 512×512 → 64×64×4) is ~80M parameters: its throughput is a GPU question and is not
  measured here (no weights can be downloaded on this machine).
"""


if __name__ == "__main__":
    main()
