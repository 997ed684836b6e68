"""From a diffusers text-to-image pipeline folder to a few-step pipeline, on the command line, per family (SD3, Flux,
Sana, PixArt-Σ, SDXL; the tiny random pipelines of tests/tiny_pipelines.py, nothing downloaded):

    scm data encode --pipeline PIPE --data captioned/ --out DIR      (its own text encoders, VAE and normalisation)
    scm train --method scd --teacher diffusers:PIPE --data DIR       (guided teacher, guidance-conditioned student)
    scm sample --ckpt RUN --prompt …                                  (prompts encoded by the pipeline's encoders)
    scm export RUN OUT                                                (a diffusers pipeline with the text encoders,
                                                                      tokenizers and VAE), loaded and run by
                                                                      diffusers: its images are scm sample's
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_pipelines import FAMILIES, IMAGE_SIZES, build_pipeline  # noqa: E402

from scm.runs import load_run  # noqa: E402

from conftest import cli  # noqa: E402

CAPTIONS = ["a red disc", "a small grey square", "a photo of a cat", "two blue dogs", "a green tree",
            "the sea at night", "a yellow car", "an old red house"]


def _captioned(root, size):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i, text in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(text)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pipeline_distils_samples_and_exports(family, tmp_path):
    from scm.diffusers import SCMPipeline
    from scm.generate import Sampler, generate

    pipe = build_pipeline(family, tmp_path / "pipe")
    data = tmp_path / "encoded"
    code, text = cli("data", "encode", "--pipeline", pipe, "--data", _captioned(tmp_path / "images",
                     IMAGE_SIZES[family]), "--out", data, "--no-progress", "--dtype", "float32")
    assert code == 0, text
    run = tmp_path / "run"
    code, text = cli("train", "--preset", "tiny-32-scd", "--data", data, "--out", run, "--teacher",
                     f"diffusers:{pipe}", "--kimg", 0.008, "--batch", 4, "loss.guidance=1,3",
                     "net.guidance_embed=true", "progress=false", "tensorboard=false", "sample_count=2")
    assert code == 0, text
    loaded = load_run(run)
    assert loaded.cfg.text.encoder["kind"] == "pipeline" and loaded.cfg.net.text_dim == loaded.cfg.text.width
    out = tmp_path / "s.npz"
    code, text = cli("sample", "--ckpt", run, "--steps", 2, "--prompt", "a cat", "--prompt", "", "--n", 2,
                     "--out", out, "--guidance", 2)
    assert code == 0, text
    images = np.load(out)["x"]
    assert images.shape == (2, IMAGE_SIZES[family], IMAGE_SIZES[family], 3)  # decoded by the pipeline's VAE
    code, text = cli("export", run, tmp_path / "exported")
    assert code == 0, text
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["text"]["encoder"]["path"] == "text_encoder" and (tmp_path / "exported" / "vae").is_dir()
    moved = tmp_path / "elsewhere"
    (tmp_path / "exported").rename(moved)  # the export encodes prompts with its own copy of the text encoders
    exported = SCMPipeline.from_pretrained(moved)
    exported.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        x, _ = generate(loaded, 2, Sampler(steps=steps), seed=5, prompt="a thin cat", guidance=2.0, progress=False)
        y = exported("a thin cat", batch_size=2, num_inference_steps=steps, seed=5, guidance_scale=2.0,
                     output_type="pt").images
        assert (y - (x + 1) / 2).abs().max() <= 1e-5, steps  # as tests/test_export.py
