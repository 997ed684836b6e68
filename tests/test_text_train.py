"""Text to image through the whole path: a captioned prepared set → a text-conditioned diffusion teacher → guided sCD
→ `scm sample --prompt` and `scm eval` (prompt adherence), with the run recording its prompts' encoder; and the
resolve step's refusals (a text preset on data without prompt embeddings, a student on data encoded otherwise)."""

from __future__ import annotations

import json

import pytest
import torch

from scm.config import make_config
from scm.data import load_dataset
from scm.data.prompts import encode_captions
from scm.errors import ConfigError, DataError
from scm.runs import load_run
from scm.train import train

from conftest import cli

SMALL = ["tensorboard=false", "progress=false", "sample_count=4", "ckpt_every_kimg=1000", "net.depth=1",
         "net.hidden_size=64", "net.num_heads=1", "net.embed_channels=64"]


@pytest.fixture(scope="module")
def text_runs(captioned, tmp_path_factory):
    data, _ = captioned
    root = tmp_path_factory.mktemp("runs")
    teacher = make_config("dit-tiny-text-28", "diffusion", SMALL, data=str(data), out=str(root / "t"), kimg=0.064,
                          batch=16)
    train(teacher)
    student = make_config("dit-tiny-text-28", "scd", SMALL, data=str(data), out=str(root / "s"), kimg=0.032,
                          batch=16, teacher=str(root / "t"))
    train(student)
    return root / "t", root / "s"


def test_a_text_run_records_its_prompts_encoder_and_samples_from_prompts(text_runs, captioned, tmp_path):
    teacher, student = text_runs
    cfg = load_run(student).cfg
    assert cfg.text.encoder == {"kind": "builtin", "width": 16, "max_tokens": 8, "version": 1}
    assert (cfg.net.text_dim, cfg.net.text_pooled_dim, cfg.net.guidance_embed) == (16, 16, True)
    assert load_run(teacher).cfg.text.caption_dropout == 0.1 and cfg.text.caption_dropout == 0.0
    assert (teacher / "samples" / "prompts.txt").read_text().splitlines()[0].startswith("0\t")
    code, out = cli("sample", "--ckpt", student, "--out", tmp_path / "s", "--prompt", "a thick seven", "--prompt",
                    "a thin one", "--n-per-prompt", 2, "--steps", 2, "--guidance", 2)
    assert code == 0, out
    lines = (tmp_path / "s" / "prompts.txt").read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["a thick seven"] * 2 + ["a thin one"] * 2
    code, out = cli("sample", "--ckpt", student, "--out", tmp_path / "x.png")
    assert code == 2 and "--prompt" in out and "text-conditioned" in out


def test_the_guided_teacher_evaluates_prompt_and_empty_prompt_in_one_call(text_runs, captioned, monkeypatch, tmp_path):
    """The training batch's prompts and the run's empty prompt stack (same padding, same dtype), so the CFG teacher
    of sCD runs once per step on the stacked batch (`loss.cfg_one_call`), and not at all twice."""
    import scm.conditioning as conditioning

    stacked, stack = [], conditioning._stacked
    monkeypatch.setattr(conditioning, "_stacked", lambda c, u: stacked.append(stack(c, u)) or stacked[-1])
    student = make_config("dit-tiny-text-28", "scd", SMALL, data=str(captioned[0]), out=str(tmp_path / "s"),
                          kimg=0.032, batch=16, teacher=str(text_runs[0]))
    train(student)
    assert len(stacked) == 2 and all(s is not None and s["text"].shape[0] == 32 for s in stacked)


def test_a_prompt_changes_the_image_and_the_same_prompt_repeats_it(text_runs):
    from scm.generate import Sampler, generate

    run = load_run(text_runs[1])
    with torch.no_grad():  # a fresh network ignores its prompt (zero cross-attention output): perturb it
        for block in run.net.blocks:
            block.cross_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    a, _ = generate(run, 2, Sampler(steps=2), prompt="a thick seven", progress=False)
    b, _ = generate(run, 2, Sampler(steps=2), prompt=["a thick seven", "a thin one"], progress=False)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_the_unet_takes_prompts_too(captioned, tmp_path):
    """The text U-Net (tiny-text) trains as a teacher and distils into a guided student on the same captioned set."""
    data, _ = captioned
    small = ["tensorboard=false", "progress=false", "sample_count=4", "ckpt_every_kimg=1000", "net.model_channels=16",
             "net.channels_per_head=8"]
    train(make_config("tiny-text-28", "diffusion", small, data=str(data), out=str(tmp_path / "t"), kimg=0.032,
                      batch=16))
    train(make_config("tiny-text-28", "scd", small, data=str(data), out=str(tmp_path / "s"), kimg=0.016, batch=16,
                      teacher=str(tmp_path / "t")))
    cfg = load_run(tmp_path / "s").cfg
    assert (cfg.net_preset, cfg.net.text_dim, cfg.net.text_pooled_dim, cfg.net.guidance_embed) == ("tiny-text", 16,
                                                                                                    16, True)
    code, out = cli("sample", "--ckpt", tmp_path / "s", "--out", tmp_path / "x", "--prompt", "a thick seven",
                    "--n-per-prompt", 2, "--steps", 2, "--guidance", 2)
    assert code == 0, out
    assert len(list((tmp_path / "x").glob("*.png"))) == 2
    pytest.importorskip("diffusers", reason="the export needs diffusers: pip install scm[diffusers]")
    from scm.diffusers import SCMPipeline
    from scm.generate import Sampler, generate

    assert cli("export", tmp_path / "s", tmp_path / "e")[0] == 0
    pipe = SCMPipeline.from_pretrained(tmp_path / "e")
    pipe.set_progress_bar_config(disable=True)
    x, _ = generate(load_run(tmp_path / "s"), 2, Sampler(steps=2), seed=1, prompt="a thin one", guidance=2.0,
                    progress=False)
    y = pipe("a thin one", num_images_per_prompt=2, num_inference_steps=2, guidance_scale=2.0, seed=1,
             output_type="latent").images
    assert (y - x).abs().max() <= 1e-5  # the export round trip's tolerance (tests/test_export.py)


def test_eval_reports_prompt_adherence_on_held_out_captions(text_runs, mnist_classifier, tmp_path):
    code, out = cli("eval", "--ckpt", text_runs[1], "--ref", "mnist-captions:test", "--n", 16, "--steps", 2,
                    "--out", tmp_path / "e")
    assert code == 0, out
    result = json.loads((tmp_path / "e.json").read_text())
    row = result["rows"][0]
    assert result["prompts"] == 16 and 0 <= row["digit_accuracy"] <= 1 and row["digit_count"] == 16
    assert 0 <= row["attributes"] <= 1 and "digit accuracy" in (tmp_path / "e.md").read_text()
    code, out = cli("eval", "--ckpt", text_runs[1], "--ref", "mnist", "--n", 16, "--steps", 2)
    assert code == 2 and "no captions" in out


def test_a_text_preset_needs_prompt_embeddings(real_mnist, monkeypatch, tmp_path):
    monkeypatch.setenv("SCM_DATA_DIR", real_mnist)
    cfg = make_config("dit-tiny-text-28", "diffusion", SMALL, data="mnist", out=str(tmp_path / "r"), kimg=0.016,
                      batch=16)
    with pytest.raises(DataError, match="holds no prompt embeddings") as e:
        train(cfg)
    assert e.value.key == "data"


def test_a_student_refuses_data_encoded_by_another_encoder(text_runs, captioned, tmp_path):
    from scm.text import BuiltinEncoder

    data = load_dataset("mnist-captions").subset(0, 32)
    other = encode_captions(data, BuiltinEncoder(width=16, max_tokens=12), tmp_path / "other", progress=False,
                            log=lambda m: None)
    cfg = make_config("dit-tiny-text-28", "sct", SMALL, data=str(other), out=str(tmp_path / "r"), kimg=0.016,
                      batch=16, init=str(text_runs[0]))
    with pytest.raises(ConfigError, match="max_tokens") as e:
        train(cfg)
    assert e.value.key == "init"
