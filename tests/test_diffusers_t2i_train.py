"""Guided sCD from each text-to-image diffusers family on the command line: `scm train --method scd --teacher
diffusers:FOLDER` on captioned MNIST (prompt embeddings of the built-in encoder, whose widths the tiny random
networks take) → a run whose student is the teacher's own class (with its guidance input) → `scm sample --prompt`.
The pipelines' own text encoders (`scm data encode` with a pipeline) are tested in test_pipeline_text.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scm.runs import load_run

from conftest import cli

diffusers = pytest.importorskip("diffusers")

WIDTH = 16  # the captioned fixture's built-in encoder: tokens and pooled vector of width 16


def _flow():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


FAMILIES = {  # tiny random networks on 28×28×1 "latents" (MNIST pixels), and their training schedulers
    "pixart": (lambda: diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=1, sample_size=28,
        patch_size=2, cross_attention_dim=16, caption_channels=WIDTH, use_additional_conditions=False,
        norm_num_groups=1), lambda: diffusers.DPMSolverMultistepScheduler()),
    "sd3": (lambda: diffusers.SD3Transformer2DModel(
        sample_size=28, patch_size=2, in_channels=1, out_channels=1, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=WIDTH, caption_projection_dim=16, pooled_projection_dim=WIDTH,
        pos_embed_max_size=14), _flow),
    "flux": (lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
        _flow),
    "sana": (lambda: diffusers.SanaTransformer2DModel(
        in_channels=1, out_channels=1, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=WIDTH,
        sample_size=28, patch_size=2), lambda: diffusers.FlowMatchEulerDiscreteScheduler()),
    "sdxl": (lambda: diffusers.UNet2DConditionModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=(2, 4), norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=WIDTH + 6 * 4),
        lambda: diffusers.EulerDiscreteScheduler()),
}


def _folder(root, model, scheduler):
    """A pipeline folder with just the network and its scheduler (what `diffusers:PATH` reads)."""
    component = "unet" if type(model).__name__.startswith("UNet") else "transformer"
    model.save_pretrained(root / component)
    scheduler.save_pretrained(root / "scheduler")
    index = {"_class_name": "DiffusionPipeline", component: ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_distils_a_text_to_image_family_and_samples_from_a_prompt(family, captioned, tmp_path):
    data, _ = captioned
    make_model, make_scheduler = FAMILIES[family]
    torch.manual_seed(0)
    folder = _folder(tmp_path / "pipe", make_model(), make_scheduler())
    run = tmp_path / "run"
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", data, "--out", run, "--teacher",
                     f"diffusers:{folder}", "--kimg", 0.016, "--batch", 8, "loss.guidance=1,3",
                     "net.guidance_embed=true", "progress=false", "tensorboard=false", "sample_count=2")
    assert code == 0, text
    loaded = load_run(run)
    model_class = type(make_model()).__name__
    assert loaded.cfg.net.model_class == model_class and loaded.cfg.net.text_dim == WIDTH
    assert loaded.cfg.text.encoder["kind"] == "builtin"  # the run records the prompts' encoder
    if family in ("flux", "sana"):  # their own guidance embedder: the student stays a class diffusers loads
        assert loaded.cfg.net.model_config["guidance_embeds"] is True
    out = tmp_path / "s.npz"
    code, text = cli("sample", "--ckpt", run, "--steps", 2, "--prompt", "a thick seven", "--prompt", "a small zero",
                     "--n-per-prompt", 2, "--out", out, "--guidance", 2)
    assert code == 0, text
    images = np.load(out)["x"]
    assert images.shape[0] == 4 and np.isfinite(images.astype(np.float64)).all()
    # exported as a diffusers pipeline, it samples as scm sample does (same seed, prompt and guidance scale)
    code, text = cli("export", run, tmp_path / "exported")
    assert code == 0, text
    from scm.diffusers import SCMPipeline
    from scm.generate import Sampler, generate

    pipe = SCMPipeline.from_pretrained(tmp_path / "exported")
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        x, _ = generate(loaded, 2, Sampler(steps=steps), seed=5, prompt="a thin one", guidance=2.0, progress=False)
        y = pipe("a thin one", batch_size=2, num_inference_steps=steps, seed=5, guidance_scale=2.0,
                 output_type="latent").images
        assert (y - x).abs().max() <= 1e-5, steps  # as tests/test_export.py


def test_a_teacher_that_takes_prompts_refuses_data_without_them_or_of_other_widths(real_mnist, captioned, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("SCM_DATA_DIR", real_mnist)
    make_model, make_scheduler = FAMILIES["sd3"]
    torch.manual_seed(0)
    folder = _folder(tmp_path / "pipe", make_model(), make_scheduler())
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", "mnist", "--out", tmp_path / "r", "--teacher",
                     f"diffusers:{folder}", "--kimg", 0.016, "progress=false")
    assert code != 0 and "takes prompts" in text, text
    from scm.data import load_dataset
    from scm.data.prompts import encode_captions
    from scm.text import BuiltinEncoder

    other = encode_captions(load_dataset("mnist-captions").subset(0, 16), BuiltinEncoder(width=8, max_tokens=8),
                            tmp_path / "other", progress=False, log=lambda m: None)
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", other, "--out", tmp_path / "r2", "--teacher",
                     f"diffusers:{folder}", "--kimg", 0.016, "progress=false")
    assert code != 0 and "widths" in text, text
    # a guidance-distilled teacher (Flux-dev: its network takes the scale) needs a guidance range
    torch.manual_seed(0)
    flux = _folder(tmp_path / "flux", FAMILIES["flux"][0](), _flow())
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", captioned[0], "--out", tmp_path / "r3",
                     "--teacher", f"diffusers:{flux}", "--kimg", 0.016, "progress=false")
    assert code == 2 and "loss.guidance" in text and "guidance-distilled" in text, text
