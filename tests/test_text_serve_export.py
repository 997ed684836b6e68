"""A text-to-image run exported as a diffusers pipeline (`scm export`): `SCMPipeline(prompt, …)` gives the images of
`scm sample --prompt …` from the same seed (the builtin toy encoder, prompts rounded to the run's storage dtype; a
guided student's guidance scale), refuses prompts in its own words, and carries a transformers text encoder with it
(a copy checked against the run's recorded digest, used wherever the folder is loaded from). Runs with fresh
weights (no training), as tests/test_export.py's."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the export tests need diffusers: pip install scm[diffusers]")

from test_serve import make_text_run

from scm.errors import ConfigError, SamplerError
from scm.generate import Sampler, generate
from scm.runs import load_run
from scm.text import MAX_PROMPT_CHARS

from conftest import cli

TOL = 1e-5  # as tests/test_export.py


def pipeline(path):
    from scm.diffusers import SCMPipeline

    pipe = SCMPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """`sct` (prompts stored as bfloat16, no guidance) and `guided` (an sCD student with a guidance input), with
    their exports."""
    root = tmp_path_factory.mktemp("text-export")
    runs = {"sct": make_text_run(root / "sct"),
            "guided": make_text_run(root / "guided", "scd", dtype="float16", teacher="a-teacher")}
    exported = {}
    for name, run in runs.items():
        code, text = cli("export", run, root / f"{name}-diffusers")
        assert code == 0, text
        exported[name] = root / f"{name}-diffusers"
    return runs, exported


def test_a_text_pipeline_samples_as_scm_sample(text_runs, tmp_path):
    """From the same seed and prompts, `SCMPipeline` gives `generate`'s images (what `scm sample` runs), for one
    prompt, a list (image i takes prompt i mod their number) and num_images_per_prompt (each prompt's images
    together, as --n-per-prompt); its PIL images are the PNGs `scm sample --prompt` writes."""
    runs, exported = text_runs
    pipe, run = pipeline(exported["sct"]), load_run(runs["sct"])
    index = json.loads((exported["sct"] / "model_index.json").read_text())
    assert index["text"]["dtype"] == "bfloat16" and index["text"]["encoder"]["kind"] == "builtin"
    assert index["text_encoder"] == [None, None]  # the builtin encoder needs no files
    for steps in (1, 2):
        x, _ = generate(run, 1, Sampler(steps=steps), seed=0, prompt="a thick seven", progress=False)
        y = pipe("a thick seven", num_inference_steps=steps, seed=0, output_type="latent").images
        assert y.shape == (1, 1, 28, 28) and (y - x).abs().max() <= TOL, steps
    x, _ = generate(run, 4, Sampler(steps=2), seed=3, prompt=["a thin one", ""], progress=False)
    y = pipe(["a thin one", ""], batch_size=4, num_inference_steps=2, seed=3, output_type="latent").images
    assert (y - x).abs().max() <= TOL
    x, _ = generate(run, 4, Sampler(steps=2), seed=3, prompt=["a", "a", "b c", "b c"], progress=False)
    y = pipe(["a", "b c"], num_images_per_prompt=2, num_inference_steps=2, seed=3, output_type="latent").images
    assert (y - x).abs().max() <= TOL and not torch.equal(y[1], y[2])
    code, text = cli("sample", "--ckpt", runs["sct"], "--prompt", "a thick seven", "--prompt", "nine", "--n", 2,
                     "--steps", 2, "--seed", 0, "--out", tmp_path / "s.npz")
    assert code == 0, text
    expected = np.load(tmp_path / "s.npz")["x"][..., 0]
    got = np.stack([np.asarray(p) for p in pipe(["a thick seven", "nine"], num_inference_steps=2, seed=0).images])
    assert np.abs(got.astype(int) - expected).max() <= 1 and (got == expected).mean() > 0.99


def test_a_guided_text_student_takes_the_guidance_scale(text_runs):
    runs, exported = text_runs
    pipe, run = pipeline(exported["guided"]), load_run(runs["guided"])
    assert pipe.config.guidance_default == 1.0 and pipe.config.text["dtype"] == "float16"
    for scale in (None, 2.5):
        x, _ = generate(run, 2, Sampler(steps=2), seed=1, prompt="an eight", guidance=scale, progress=False)
        y = pipe("an eight", batch_size=2, num_inference_steps=2, seed=1, guidance_scale=scale,
                 output_type="latent").images
        assert (y - x).abs().max() <= TOL, scale
    assert not torch.equal(y, pipe("an eight", batch_size=2, num_inference_steps=2, seed=1,
                                   output_type="latent").images)


def test_prompt_refusals_in_the_pipelines_words(text_runs, tmp_path):
    from test_export import make_run

    _, exported = text_runs
    pipe = pipeline(exported["sct"])

    def refused(key, pattern, p=pipe, **kwargs):
        with pytest.raises(SamplerError, match=pattern) as e:
            p(output_type="latent", **kwargs)
        assert e.value.key == key

    refused("prompt", "give a prompt")
    refused("prompt", "give a prompt", batch_size=2)
    refused("prompt", "NUL", prompt="a\x00b")
    refused("prompt", f"at most {MAX_PROMPT_CHARS}", prompt="x" * (MAX_PROMPT_CHARS + 1))
    refused("prompt", "must be text", prompt=["a", 3])
    refused("prompt", "a str, or a list", prompt=[])
    refused("batch_size", "4 images asked", prompt=["a", "b"], num_images_per_prompt=2, batch_size=3)
    refused("num_images_per_prompt", ">= 1", prompt="a", num_images_per_prompt=0)
    refused("guidance_scale", "takes no guidance", prompt="a", guidance_scale=2.0)
    # a class-label pipeline given a prompt; as before, an int first argument is the batch size
    make_run(tmp_path / "sct", "tiny-28-sct")
    assert cli("export", tmp_path / "sct", tmp_path / "sct-diffusers")[0] == 0
    plain = pipeline(tmp_path / "sct-diffusers")
    refused("prompt", "takes no prompt", p=plain, prompt="a thick seven")
    refused("num_images_per_prompt", "give a prompt", p=plain, num_images_per_prompt=2)
    assert plain(3, output_type="latent").images.shape == (3, 1, 28, 28)


# -- a transformers text encoder travels with the export ---------------------------------------------------------
def test_a_transformers_text_encoder_is_copied_and_checked(tmp_path):
    """The encoder's folder (safetensors, config and tokenizer files; no pickle) is copied into text_encoder/; the
    pipeline, moved elsewhere and with the original encoder gone, encodes with its copy and samples as the run
    did; a copy whose weights changed is refused (the run's recorded digest)."""
    pytest.importorskip("transformers")
    import transformers as tf
    from test_text_encoders import SPECIALS, WORDS, _save_tokenizer

    from scm.text_transformers import load_transformers_encoder

    ids = {"vocab_size": len(SPECIALS) + len(WORDS), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 3}
    torch.manual_seed(0)
    model = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**ids, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=37,
                                                             max_position_embeddings=16, projection_dim=16))
    folder = tmp_path / "clip"
    model.eval().save_pretrained(folder)
    _save_tokenizer(folder, model_max_length=16)
    (folder / "stray.bin").write_bytes(b"not copied")
    encoder = load_transformers_encoder(folder, max_tokens=8)
    run = make_text_run(tmp_path / "run", encoder=encoder, dtype="float32")
    prompt = "a photo of a red cat"
    x, _ = generate(load_run(run), 2, Sampler(steps=2), seed=4, prompt=prompt, progress=False)

    assert cli("export", run, tmp_path / "out")[0] == 0
    copied = sorted(p.name for p in (tmp_path / "out" / "text_encoder").iterdir())
    assert "model.safetensors" in copied and "tokenizer.json" in copied and "scm_text_encoder.json" in copied
    assert "stray.bin" not in copied
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["text_encoder"] == ["scm.diffusers.pipeline", "SCMTextEncoder"]
    assert index["text"]["encoder"]["path"] == "text_encoder"
    assert index["text"]["encoder"]["weights_sha256"] == encoder.spec["weights_sha256"]
    shutil.move(tmp_path / "out", tmp_path / "moved")
    shutil.rmtree(folder)
    code, text = cli("export", run, tmp_path / "again")  # the run's encoder is gone: nothing to copy
    assert code == 2 and "text encoder" in text and "no such folder" in text and not (tmp_path / "again").exists()
    pipe = pipeline(tmp_path / "moved")
    y = pipe(prompt, batch_size=2, num_inference_steps=2, seed=4, output_type="latent").images
    assert (y - x).abs().max() <= TOL
    assert not torch.equal(y, pipe("the sea", batch_size=2, num_inference_steps=2, seed=4, output_type="latent").images)

    shutil.copytree(tmp_path / "moved", tmp_path / "tampered")
    weights = tmp_path / "tampered" / "text_encoder" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    first = sorted(state)[0]
    state[first] = state[first] + 1
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="weights changed"):
        pipeline(tmp_path / "tampered")(prompt, output_type="latent")
