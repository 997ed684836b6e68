"""`scm export RUN OUT --format diffusers` and `scm.diffusers.SCMPipeline`: runs with fresh weights (no training)
exported, loaded back with `SCMPipeline.from_pretrained`, and sampled: the same images as `scm sample` (the library's
`generate`) from the same seed, for 1 and 2 steps, for an unconditional U-Net, a class-conditional DiT with a
guidance input, a run with σ_d ≠ 0.5 and a run on latents with its VAE; the folder holds only safetensors and
JSON and records the paper's times; the command's errors name what is wrong."""

import json
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the export tests need diffusers: pip install scm[diffusers]")

from scm.config import make_config, to_dict
from scm.errors import SamplerError
from scm.generate import Sampler, generate, image_generators
from scm.nets import build_net
from scm.runs import RunDir, ema_key, load_run

from conftest import cli, save_tiny_vae

CLASSES = 3
TOL = 1e-5  # max |difference| of the float images before quantisation (measured on CPU: at most 4e-7)


def make_run(path, preset, overrides=(), latent=None, **flags):
    """A run directory with one checkpoint of fresh weights (zero-initialised parameters given small values, so
    that images depend on the noise) and two EMAs (σ_rel 0.05 and 0.1, different weights), without training."""
    cfg = make_config(preset, None, [*overrides, "ema.stds=0.05,0.1"], data="shapes", out=str(path), **flags)
    run = RunDir(path)
    run.write_config(to_dict(cfg))
    run.write_latent(latent)
    ema = {}
    for seed, std in enumerate(cfg.ema.stds):
        torch.manual_seed(seed)
        net = build_net(cfg.net, cfg.loss.sigma_d)
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.fill_(1.0) if p.numel() == 1 else p.normal_(0, 0.05)
        ema.update({ema_key(std, k): v for k, v in net.state_dict().items()})
    run.save(1, {"ema": ema}, {"step": 1}, keep=1)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs and their exports: `sct` (unconditional U-Net), `guided` (a class-conditional DiT sCD student with a
    guidance input), `sigma` (σ_d = 0.6), `latent` (16×16×4 latents of a random 32×32×3 AutoencoderKL)."""
    root = tmp_path_factory.mktemp("export")
    save_tiny_vae(root / "vae")
    latent = {"vae": str(root / "vae"), "mean": [0.1, -0.2, 0.3, 0.0], "std": [1.5, 2.0, 0.8, 1.2], "sigma_d": 0.5,
              "which": "mean", "image_resolution": 32, "image_channels": 3, "normalization": "given"}
    runs = {
        "sct": make_run(root / "sct", "tiny-28-sct"),
        "guided": make_run(root / "guided", "dit-tiny-28-scd", ["conditional=true", f"net.label_dim={CLASSES}",
                                                                  "net.guidance_embed=true", "loss.guidance=1,2"],
                           teacher="a-teacher"),
        "sigma": make_run(root / "sigma", "tiny-28-sct", ["loss.sigma_d=0.6"]),
        "latent": make_run(root / "latent", "tiny-latent-sct", latent=latent),
    }
    exported = {}
    for name, run in runs.items():
        code, text = cli("export", run, root / f"{name}-diffusers", "--format", "diffusers")
        assert code == 0, text
        assert "SCMPipeline.from_pretrained" in text
        exported[name] = root / f"{name}-diffusers"
    return root, runs, exported


def pipeline(path):
    from scm.diffusers import SCMPipeline

    pipe = SCMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images01(x: torch.Tensor) -> torch.Tensor:
    """scm's images in [-1, 1] as the pipeline's "pt" output: [0, 1], clamped."""
    return (x * 0.5 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("name", ["sct", "guided", "sigma", "latent"])
def test_the_exported_pipeline_samples_as_scm_sample(runs, name):
    """From the same seed, `SCMPipeline` and `generate` (what `scm sample` runs) give the same images for 1 and
    2 steps: the same times (t_max = arctan(80/σ_d), the run's t_mid), the same per-image noise in the same order,
    the same class labels and guidance by default, the same decoding of latents."""
    _, run_dirs, exported = runs
    pipe, run = pipeline(exported[name]), load_run(run_dirs[name])
    n = 4
    for steps in (1, 2):
        x, _ = generate(run, n, Sampler(steps=steps), seed=7, progress=False)
        images = pipe(batch_size=n, num_inference_steps=steps, seed=7, output_type="pt").images
        assert images.shape == x.shape and images.dtype == torch.float32
        assert (images - images01(x)).abs().max() <= TOL, (name, steps)
        # per-image generators (scm's convention) are the same as the seed
        gens = image_generators(7, 0, n, "cpu")
        again = pipe(batch_size=n, num_inference_steps=steps, generator=gens, output_type="pt").images
        assert torch.equal(again, images)
        if name != "latent":  # pixels: the samples themselves (unclamped), before any conversion
            raw = pipe(batch_size=n, num_inference_steps=steps, seed=7, output_type="latent").images
            assert (raw - x).abs().max() <= TOL
    assert images.std() > 0.05  # the images depend on the noise


def test_pil_images_are_the_pngs_of_scm_sample(runs, tmp_path):
    """`pipe(seed=s, output_type="pil")` gives the images `scm sample --seed s` writes (a 2-step sample)."""
    _, run_dirs, exported = runs
    code, text = cli("sample", "--ckpt", run_dirs["sct"], "--steps", 2, "--n", 3, "--seed", 5,
                     "--out", tmp_path / "s.npz")
    assert code == 0, text
    expected = np.load(tmp_path / "s.npz")["x"][..., 0]
    pils = pipeline(exported["sct"])(batch_size=3, num_inference_steps=2, seed=5).images
    assert [p.size for p in pils] == [(28, 28)] * 3 and pils[0].mode == "L"
    got = np.stack([np.asarray(p) for p in pils])
    assert np.abs(got.astype(int) - expected).max() <= 1 and (got == expected).mean() > 0.99


def test_ema_choice_and_explicit_times(runs, tmp_path):
    """--ema picks the EMA (as `scm sample --ema`); `timesteps=` are `scm sample --ts`; N > 2 steps use scm's
    schedule; `latents=` replaces the initial noise."""
    _, run_dirs, _ = runs
    code, text = cli("export", run_dirs["sct"], tmp_path / "ema", "--ema", 0.1)
    assert code == 0, text
    pipe, run = pipeline(tmp_path / "ema"), load_run(run_dirs["sct"], 0.1)
    assert pipe.config.source["ema_std"] == 0.1
    for kwargs, sampler in (({"num_inference_steps": 2}, Sampler(steps=2)),
                            ({"num_inference_steps": 4}, Sampler(steps=4)),
                            ({"timesteps": [1.5, 1.0, 0.4, 0.0]}, Sampler(ts=(1.5, 1.0, 0.4)))):
        x, _ = generate(run, 3, sampler, seed=2, progress=False)
        y = pipe(batch_size=3, seed=2, output_type="latent", **kwargs).images
        assert (y - x).abs().max() <= TOL, kwargs
    noise = 0.5 * torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = pipe(latents=noise, output_type="latent").images
    F = run.net(noise / 0.5, torch.full((2,), math.atan(160)))
    assert (y - (math.cos(math.atan(160)) * noise - math.sin(math.atan(160)) * 0.5 * F)).abs().max() <= TOL


def test_class_labels_and_guidance(runs):
    _, run_dirs, exported = runs
    pipe, run = pipeline(exported["guided"]), load_run(run_dirs["guided"])
    assert pipe.config.guidance_default == 1.0  # the lower end of the student's training range, as scm sample
    for label, scale in ((2, None), (0, 1.7)):
        x, _ = generate(run, 3, Sampler(steps=2), seed=1, class_label=label, guidance=scale, progress=False)
        y = pipe(batch_size=3, num_inference_steps=2, seed=1, class_labels=label, guidance_scale=scale,
                 output_type="latent").images
        z = pipe(batch_size=3, num_inference_steps=2, seed=1, class_labels=[label] * 3, guidance_scale=scale,
                 output_type="latent").images
        assert (y - x).abs().max() <= TOL and torch.equal(y, z)
    a = pipe(batch_size=3, seed=1, guidance_scale=1.0, output_type="latent").images
    b = pipe(batch_size=3, seed=1, guidance_scale=2.0, output_type="latent").images
    c = pipe(batch_size=3, seed=1, class_labels=torch.tensor([2, 1, 0]), output_type="latent").images
    assert not torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a[1], c[1])  # image 1 is class 1 in both

    def refused(pattern, p=pipe, **kwargs):
        with pytest.raises(SamplerError, match=pattern):
            p(batch_size=3, output_type="latent", **kwargs)

    refused(r"classes 0\.\.2", class_labels=3)
    refused("3 labels for a batch of 2", class_labels=[0, 1, 2], latents=torch.zeros(2, 1, 28, 28))
    refused("class indices", class_labels=[0.5, 1.0, 2.0])
    refused("must be a scale > 0", guidance_scale=0)
    refused("2 generators for a batch of 3", generator=[torch.Generator(), torch.Generator()])
    refused("a seed or a generator", seed=0, generator=torch.Generator())
    with pytest.raises(SamplerError, match="output_type='jpeg'"):
        pipe(output_type="jpeg")
    refused("strictly decreasing", timesteps=[1.0, 1.2])
    refused(r"latents: expected a tensor of shape \[B, 1, 28, 28\]", latents=torch.zeros(2, 3, 28, 28))
    sct = pipeline(exported["sct"])
    refused("this model is unconditional", p=sct, class_labels=0)
    refused("neither a guidance input", p=sct, guidance_scale=2.0)


def test_the_folder_holds_safetensors_and_json_and_records_the_times(runs):
    from diffusers import AutoencoderKL, SCMScheduler

    _, _, exported = runs
    # the run's t_mid is the pipeline's: tiny-28-sct's own 1.3, the paper's 1.1 for tiny-latent-sct
    for name, sigma_d, t_mid in (("sct", 0.5, 1.3), ("sigma", 0.6, 1.3), ("latent", 0.5, 1.1)):
        out = exported[name]
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert not [f for f in files if f.endswith((".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"))], files
        assert {f.rsplit(".", 1)[-1] for f in files} == {"json", "safetensors"}, files
        assert "model/diffusion_pytorch_model.safetensors" in files
        index = json.loads((out / "model_index.json").read_text())
        assert index["_class_name"] == "SCMPipeline"
        assert index["t_max"] == pytest.approx(math.atan(80 / sigma_d), abs=1e-12) and index["t_mid"] == t_mid
        assert index["model"] == ["scm.diffusers.pipeline", "SCMModel"]
        scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == "trigflow" and scheduler["sigma_data"] == sigma_d
        model = json.loads((out / "model" / "config.json").read_text())
        assert model["net_preset"] == "tiny" and model["sigma_d"] == sigma_d and model["net_config"]["img_channels"]
        pipe = pipeline(out)
        assert isinstance(pipe.scheduler, SCMScheduler)
        assert pipe.times(1) == [index["t_max"]] and pipe.times(2) == [index["t_max"], t_mid]
        pipe(num_inference_steps=2, seed=0, output_type="latent")
        assert pipe.scheduler.timesteps.tolist() == pytest.approx([index["t_max"], t_mid, 0.0], abs=1e-6)
    latent = runs[0] / "latent-diffusers"
    assert (latent / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    index = json.loads((latent / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["latent_std"] == [1.5, 2.0, 0.8, 1.2]
    assert isinstance(pipeline(latent).vae, AutoencoderKL)
    pil = pipeline(latent)(batch_size=2, seed=0).images
    assert [p.size for p in pil] == [(32, 32)] * 2 and pil[0].mode == "RGB"
    assert pipeline(latent)(batch_size=2, seed=0, output_type="np").images.shape == (2, 32, 32, 3)
    assert pipeline(latent)(batch_size=2, seed=0, output_type="latent").images.shape == (2, 4, 16, 16)


def test_a_diffusers_student_exports_like_any_network(tmp_path):
    """A run whose network is a diffusers model wrapped as an scm student (net_preset "diffusers") exports through
    the same path (its config names the diffusers class and holds its config) and samples as `scm sample`."""
    from diffusers import DDPMScheduler, UNet2DModel

    from scm.diffusers import student_from_diffusers

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    student = student_from_diffusers(unet, DDPMScheduler(), sigma_d=0.5)
    cfg = make_config("tiny-28-sct", None, ["net_preset=diffusers", "resolution=16", "channels=3"], data="x",
                      out=str(tmp_path / "run"))
    cfg.net = student.cfg
    run = RunDir(tmp_path / "run")
    run.write_config(to_dict(cfg))
    run.save(1, {"ema": {ema_key(cfg.ema.stds[0], k): v for k, v in student.state_dict().items()}}, {"step": 1}, keep=1)
    code, text = cli("export", tmp_path / "run", tmp_path / "out")
    assert code == 0, text
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["net_preset"] == "diffusers"
    pipe, loaded = pipeline(tmp_path / "out"), load_run(tmp_path / "run")
    for steps in (1, 2):
        x, _ = generate(loaded, 2, Sampler(steps=steps), seed=0, progress=False)
        y = pipe(batch_size=2, num_inference_steps=steps, seed=0, output_type="latent").images
        assert (y - x).abs().max() <= TOL * max(1.0, float(x.abs().max()))


def test_export_errors_name_what_is_wrong(runs, tmp_path, monkeypatch):
    _, run_dirs, exported = runs

    def expect(args, *patterns):
        code, text = cli("export", *args)
        assert code == 2 and "Traceback" not in text, text
        for pattern in patterns:
            assert pattern in text, text

    expect([tmp_path / "missing", tmp_path / "o1"], str(tmp_path / "missing"), "no such run directory")
    (tmp_path / "empty").mkdir()
    expect([tmp_path / "empty", tmp_path / "o2"], str(tmp_path / "empty"), "not a scm run directory")
    expect([run_dirs["sct"], exported["sct"]], "OUT", str(exported["sct"]), "already exists", "choose another OUT")
    expect([run_dirs["sct"], tmp_path / "o3", "--format", "onnx"], "--format onnx", "diffusers")
    expect([run_dirs["sct"], tmp_path / "o4", "--ema", 0.2], "--ema", "σ_rel=0.2", "0.05, 0.1")
    teacher = make_run(tmp_path / "teacher", "tiny-28-diffusion")
    expect([teacher, tmp_path / "o5"], "a diffusion run", "sCT or sCD")
    (tmp_path / "a-file").write_text("")
    expect([run_dirs["sct"], tmp_path / "a-file" / "o7"], "OUT", "a-file is a file, not a folder")
    # without diffusers: which extra to install
    monkeypatch.delitem(sys.modules, "scm.diffusers.pipeline", raising=False)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    expect([run_dirs["sct"], tmp_path / "o6"], "pip install scm[diffusers]")
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir() if p.name != "empty")


def test_the_pipelines_network_compiles_as_one_graph(runs):
    """The exported pipeline's network compiles whole (`pipe.model = torch.compile(pipe.model)`; on a GPU
    mode="reduce-overhead" replays it as CUDA graphs), guidance input included, and the pipeline then gives the
    eager samples (on the CPU a graph of PyTorch's own kernels: the same arithmetic); another guidance scale runs in
    the same graph."""
    import torch._dynamo

    _, _, exported = runs
    pipe = pipeline(exported["guided"])
    eager = pipe(batch_size=3, num_inference_steps=2, seed=4, guidance_scale=1.5, output_type="latent").images
    torch._dynamo.reset()
    try:
        pipe.model = torch.compile(pipe.model, backend="aot_eager", fullgraph=True)
        for _ in range(2):  # the second call replays the graph
            again = pipe(batch_size=3, num_inference_steps=2, seed=4, guidance_scale=1.5, output_type="latent").images
            assert torch.equal(again, eager)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        other = pipe(batch_size=3, num_inference_steps=2, seed=4, guidance_scale=1.8, output_type="latent").images
        assert not torch.equal(other, eager)  # the scale is an input of the graph: no graph of its own
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
