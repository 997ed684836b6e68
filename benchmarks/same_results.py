"""Same results before and after a change of structure: train, sample, export and serve a fixed set of small runs
and record a SHA-256 of every tensor and image they produce; then compare two such records.

    python benchmarks/same_results.py OUT                     # OUT/hashes.json (and the runs, under OUT/)
    python benchmarks/same_results.py --compare A.json B.json # exit 1 when anything differs

Run it once at the old commit (PYTHONPATH=<old checkout>/src) and once at the new one, on the same machine. It
goes through the command line (`scm train`, `scm sample`, `scm export`) and entry points whose signatures both
sides share (`scm.runs.load_run`, `scm.generate.generate`, `scm.serve.models.ServedModel`, `SCMPipeline`), so it
measures behaviour, not code. Each run trains 10 steps of 32 MNIST digits (the diffusers one: 4 steps of 8) on the
CPU, so the whole record takes a few minutes. Configuration files are compared for information only (a structure
change may rename or drop a field); tensors and images must be equal bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

COMMON = ["--data", "mnist", "--kimg", "0.32", "--batch", "32", "progress=false", "tensorboard=false",
          "sample_every_kimg=None", "sample_count=16"]
# name → scm train arguments: the three runs of benchmarks/results/issue9-before-after.md, a DiT and a diffusers one
RUNS = {
    "scd-guided": ["--preset", "tiny-28-scd", "--teacher", "demo/teacher", "conditional=true",
                   "net.guidance_embed=true", "loss.guidance=2,2", "net.dropout=0.1", *COMMON],
    "sct-init": ["--preset", "tiny-28-sct", "--init", "demo/teacher", "net.dropout=0.1", *COMMON],
    "diffusion-cond": ["--preset", "tiny-28-diffusion", "conditional=true", "net.label_dropout=0.1", *COMMON],
    "dit-sct": ["--preset", "dit-tiny-28-sct", *COMMON],
}
SAMPLES = {  # name → (run, generate keywords)
    "scd-guided/2step": ("scd-guided", dict(steps=2, n=12)),
    "scd-guided/1step-class3-g1.5": ("scd-guided", dict(steps=1, n=6, class_label=3, guidance=1.5)),
    "sct-init/2step": ("sct-init", dict(steps=2, n=12)),
    "diffusion-cond/heun5": ("diffusion-cond", dict(nfe=5, n=12)),
    "diffusion-cond/heun5-class7-g2": ("diffusion-cond", dict(nfe=5, n=6, class_label=7, guidance=2.0)),
    "dit-sct/1step": ("dit-sct", dict(steps=1, n=8)),
    "teacher/heun9": ("teacher", dict(nfe=9, n=12)),
    "scd-diffusers/2step": ("scd-diffusers", dict(steps=2, n=8)),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensor_sha(x: torch.Tensor) -> str:
    shape = x.shape
    x = x.detach().cpu().contiguous().reshape(-1)
    return sha(str(x.dtype).encode() + str(tuple(shape)).encode() + x.view(torch.uint8).numpy().tobytes())


def scm(*args) -> None:
    cmd = [sys.executable, "-m", "scm", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def diffusers_teacher(out: Path) -> list[str]:
    """A random diffusers UNet2DModel (v-prediction, 16×16×1) in a pipeline folder, and 64 MNIST crops to fit it."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    pipe = out / "diffusers-teacher"
    unet.save_pretrained(pipe / "unet")
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers",
                                           "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    from scm.data import load_dataset

    digits = load_dataset("mnist").images[:64, 0, 6:22, 6:22]
    np.savez(out / "crops16.npz", x=np.asarray(digits))
    return ["--preset", "tiny-28-scd", "--teacher", f"diffusers:{pipe}", "--data", out / "crops16.npz", "--kimg",
            "0.032", "--batch", "8", "resolution=16", "progress=false", "tensorboard=false", "sample_count=4"]


def checkpoint_hashes(run: Path) -> dict:
    from safetensors.torch import load_file

    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        for k, v in sorted(load_file(str(f)).items()):
            out[f"{f.stem}/{k}"] = tensor_sha(v)
    for png in sorted((run / "samples").glob("*.png")):
        out[f"samples/{png.name.split('-', 1)[1]}"] = sha(png.read_bytes())
    return out


def sample_hashes(out: Path) -> dict:
    from scm.generate import Sampler, generate
    from scm.runs import load_run

    runs = {name: out / name for name in (*RUNS, "scd-diffusers")} | {"teacher": Path("demo/teacher")}
    hashes = {}
    for name, (run, kw) in SAMPLES.items():
        kw = dict(kw)
        sampler = Sampler(steps=kw.pop("steps", None), nfe=kw.pop("nfe", None))
        images, _ = generate(load_run(runs[run]), kw.pop("n"), sampler, seed=3, progress=False, **kw)
        hashes[f"generate/{name}"] = tensor_sha(images)
    return hashes


def export_hashes(out: Path) -> dict:
    from scm.diffusers import SCMPipeline

    if not (out / "exported").exists():
        scm("export", out / "scd-guided", out / "exported")
    pipe = SCMPipeline.from_pretrained(out / "exported")
    a = pipe(batch_size=6, num_inference_steps=2, seed=5, output_type="pt").images
    b = pipe(batch_size=4, num_inference_steps=1, seed=1, class_labels=[1, 2, 3, 4], guidance_scale=1.5,
             output_type="pt").images
    return {"pipeline/2step": tensor_sha(a), "pipeline/1step-classes-g1.5": tensor_sha(b)}


def serve_hashes(out: Path) -> dict:
    from scm.runs import load_run
    from scm.serve.models import ServedModel

    student = ServedModel(load_run(out / "scd-guided"), "student")
    teacher = ServedModel(load_run("demo/teacher"), "teacher", steps=(5,))
    hashes = {}
    for name, model, params in (("student-2step", student, {"seed": "4", "steps": "2", "batch": "4"}),
                                ("student-class-g", student, {"seed": "9", "class": "5", "guidance": "1.25"}),
                                ("teacher-class", teacher, {"seed": "2", "class": "8", "batch": "4"})):
        hashes[f"serve/{name}"] = sha(model.generate(model.check(params)).png)
    return hashes


def record(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    configs, tensors = {}, {}
    for name, args in {**RUNS, "scd-diffusers": diffusers_teacher(out)}.items():
        if not (out / name / "checkpoints").is_dir():
            scm("train", "--out", out / name, *args)
        configs[name] = json.loads((out / name / "config.json").read_text())
        tensors.update({f"{name}/{k}": v for k, v in checkpoint_hashes(out / name).items()})
    tensors.update(sample_hashes(out))
    tensors.update(export_hashes(out))
    tensors.update(serve_hashes(out))
    result = {"torch": torch.__version__, "tensors": tensors, "configs": configs}
    (out / "hashes.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def compare(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    ta, tb = a["tensors"], b["tensors"]
    same = [k for k in ta if tb.get(k) == ta[k]]
    differ = [k for k in ta if k in tb and tb[k] != ta[k]]
    only = sorted(set(ta) ^ set(tb))
    groups: dict[str, list[int]] = {}
    for k in ta:
        group = "/".join(k.split("/")[:2]) if k.split("/")[1] in ("net", "ema", "optim") else k
        groups.setdefault(group, [0, 0])[k in same] += 1
    print("| what | identical | differing |\n|---|---|---|")
    for g, (bad, good) in groups.items():
        print(f"| {g} | {good} | {bad} |")
    for name in a["configs"]:
        fa, fb = dict(_flat(a["configs"][name])), dict(_flat(b["configs"].get(name, {})))
        diffs = sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "(absent)") != fb.get(k, "(absent)"))
        if diffs:
            print(f"config of {name}: " + "; ".join(f"{k}: {fa.get(k, '(absent)')!r} → {fb.get(k, '(absent)')!r}"
                                                    for k in diffs))
    print(f"{len(same)} identical, {len(differ)} differing, {len(only)} in one record only")
    return 1 if differ or only else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path)
    p.add_argument("--compare", nargs=2, type=Path)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.compare:
        raise SystemExit(compare(*args.compare))
    if args.out is None:
        p.error("give OUT or --compare A B")
    result = record(args.out)
    print(f"{len(result['tensors'])} hashes → {args.out / 'hashes.json'}")


if __name__ == "__main__":
    main()
