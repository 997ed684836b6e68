"""A diffusers text-to-image pipeline's own prompt encoding (scm.diffusers.pipeline_text) and `scm data encode
--pipeline`, on the tiny random pipelines of tests/tiny_pipelines.py (SD3, Flux, Sana, PixArt-Σ, SDXL; nothing is
downloaded):

1. each tiny folder is a pipeline diffusers loads and samples from (2 steps);
2. `PipelineTextEncoder.encode` is exactly the pipeline's own `encode_prompt` (float32, bit for bit), with the
   tokenizer's mask where the network takes one and all-True masks where it attends to every token, the pooled
   embedding its network takes, and "" as the pipeline's unconditional input (its negative-prompt embedding);
3. the spec reloads the same encoder through `scm.text.load_text_encoder`, and a folder that changed is named;
4. unsafe or incomplete folders are refused with the file named;
5. `scm data encode --pipeline` stores the latents of the pipeline's own VAE normalised as its network was trained
   and the prompt embeddings of its own encoders.
"""

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_pipelines import FAMILIES, IMAGE_SIZES, MAX_LENGTH, build_pipeline  # noqa: E402

from scm.data import load_dataset  # noqa: E402
from scm.diffusers.pipeline_text import PIPELINES, PipelineTextEncoder, load_pipeline_encoder  # noqa: E402
from scm.errors import ConfigError  # noqa: E402
from scm.text import load_text_encoder  # noqa: E402

from conftest import cli  # noqa: E402

PROMPTS = ["a photo of a cat", "Red dog on the mat with a big blue sky over the sea, painting of a small grey bird",
           "two things, and nothing at all (zebra!)"]
CLASSES = {spec.name: name for name, spec in PIPELINES.items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: build_pipeline(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipes(folders):
    """Each family's whole pipeline as diffusers loads it from its folder."""
    out = {}
    for family, folder in folders.items():
        out[family] = diffusers.DiffusionPipeline.from_pretrained(folder)
        out[family].set_progress_bar_config(disable=True)
    return out


@torch.no_grad()  # as the pipeline's __call__ runs it
def _reference(pipe, family: str, prompts: list[str], guided: bool = False):
    """(tokens, mask, pooled) of the pipeline's own encode_prompt for `prompts` (mask, pooled: None where it gives
    none), and with `guided` its negative-prompt ones: the unconditional input of classifier-free guidance."""
    n = MAX_LENGTH  # the pipelines' max_sequence_length, capped at the tiny tokenizers' model_max_length
    if family == "flux":  # no negative prompt: the unconditional input is "" encoded as a prompt
        tokens, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=n)
        return tokens, None, pooled
    if family in ("sd3", "sdxl"):
        extra = {"prompt_3": None, "max_sequence_length": n} if family == "sd3" else {}
        out = pipe.encode_prompt(prompts, None, device="cpu", do_classifier_free_guidance=guided, **extra)
        return out[1 if guided else 0], None, out[3 if guided else 2]
    extra = {}
    if family == "sana":  # what its __call__ passes by default
        extra["complex_human_instruction"] = inspect.signature(type(pipe).__call__).parameters[
            "complex_human_instruction"].default
    out = pipe.encode_prompt(prompts, do_classifier_free_guidance=guided, device="cpu", max_sequence_length=n, **extra)
    return out[2 if guided else 0], out[3 if guided else 1].bool(), None


# -- the tiny pipelines ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_pipeline_loads_in_diffusers_and_samples(family, folders, pipes):
    pipe = pipes[family]
    assert type(pipe).__name__ == CLASSES[family]
    assert sum(f.stat().st_size for f in folders[family].rglob("*") if f.is_file()) < 2**20
    size = IMAGE_SIZES[family]
    extra = {"use_resolution_binning": False} if family in ("sana", "pixart") else {}
    images = pipe("a photo of a cat", num_inference_steps=2, height=size, width=size, output_type="np",
                  generator=torch.Generator().manual_seed(0), **extra).images
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()


# -- the encoding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_is_the_pipelines_own_encode_prompt(family, folders, pipes):
    enc = load_pipeline_encoder(folders[family])
    got = enc.encode(PROMPTS)
    tokens, mask, pooled = _reference(pipes[family], family, PROMPTS)
    assert got.tokens.dtype == torch.float32 and torch.equal(got.tokens, tokens)
    masked = family in ("sana", "pixart")  # the networks that take a padding mask
    assert torch.equal(got.mask, mask) if masked else got.mask.all()
    assert not masked or not got.mask.all()  # short prompts are padded
    assert (got.pooled is None) == (pooled is None) and (pooled is None or torch.equal(got.pooled, pooled))
    assert (enc.max_tokens, enc.width, enc.pooled_width) == (tokens.shape[1], tokens.shape[2],
                                                             0 if pooled is None else pooled.shape[1])
    assert enc.spec["max_tokens"] == (2 * MAX_LENGTH if family == "sd3" else MAX_LENGTH)  # SD3: CLIP, then T5
    # "" is the unconditional input: the negative-prompt embedding, wherever it stands in a batch
    null, mixed = enc.encode([""]), enc.encode([PROMPTS[0], ""])
    u_tokens, u_mask, u_pooled = _reference(pipes[family], family, [""], guided=True)
    assert torch.equal(null.tokens, u_tokens) and torch.equal(mixed.tokens[1:], u_tokens)
    assert torch.equal(null.mask, u_mask) if masked else null.mask.all()
    assert u_pooled is None or torch.equal(null.pooled, u_pooled)
    as_prompt = _reference(pipes[family], family, [""])[0]
    if family == "sdxl":  # force_zeros_for_empty_prompt
        assert not null.tokens.any() and not null.pooled.any() and as_prompt.any()
    if family == "sana":  # its prompts carry the complex human instruction, its negative prompt does not
        assert not torch.equal(null.tokens, as_prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_spec_reloads_the_same_encoder(family, folders):
    enc = load_pipeline_encoder(folders[family])
    spec = json.loads(json.dumps(enc.spec))
    assert spec["kind"] == "pipeline" and spec["class"] == CLASSES[family] and spec["family"] == family
    assert spec["path"] == str(folders[family].resolve()) and len(spec["components"]) == len(PIPELINES[
        CLASSES[family]].encoders)
    again = load_text_encoder(spec)
    assert isinstance(again, PipelineTextEncoder) and again.spec == enc.spec
    assert torch.equal(again.encode(PROMPTS).tokens, enc.encode(PROMPTS).tokens)
    by_path = load_text_encoder(str(folders[family]))  # a supported pipeline folder is its own encoder
    assert by_path.spec == enc.spec


def test_a_recorded_length_and_a_changed_folder(folders, tmp_path):
    folder = shutil.copytree(folders["pixart"], tmp_path / "pixart")
    short = load_text_encoder(str(folder), max_tokens=6)
    assert short.spec["call"]["max_sequence_length"] == 6 and short.encode(PROMPTS).tokens.shape[1] == 6
    assert load_text_encoder(json.loads(json.dumps(short.spec))).max_tokens == 6
    with pytest.raises(ConfigError, match="takes no max_sequence_length"):
        load_pipeline_encoder(folders["sdxl"], max_sequence_length=8)
    spec = load_pipeline_encoder(folder).spec
    _edit_json(folder / "tokenizer" / "tokenizer_config.json", model_max_length=12)
    with pytest.raises(ConfigError, match="text_encoder's tokenizer files changed") as e:
        load_text_encoder(spec)
    assert e.value.key == "text_encoder"


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_default_lengths_are_the_pipelines_own(folders, tmp_path):
    """max_sequence_length: the pipeline's default (PixArt-Σ 300; Flux-dev 512, Flux-schnell 256) where the tokenizer
    records no model_max_length of its own (transformers' huge placeholder)."""
    for family, tokenizer, length in (("pixart", "tokenizer", 300), ("flux", "tokenizer_2", 512)):
        folder = shutil.copytree(folders[family], tmp_path / family)
        _edit_json(folder / tokenizer / "tokenizer_config.json", model_max_length=int(1e30))
        enc = load_pipeline_encoder(folder)
        assert enc.spec["call"]["max_sequence_length"] == enc.max_tokens == length
    _edit_json(folder / "transformer" / "config.json", guidance_embeds=False)  # FLUX.1-schnell
    assert load_pipeline_encoder(folder).max_tokens == 256


# -- refusals --------------------------------------------------------------------------------------------------------
def test_unsafe_or_incomplete_folders_are_refused_by_name(folders, tmp_path):
    pickled = shutil.copytree(folders["pixart"], tmp_path / "pickled")
    weights = pickled / "text_encoder" / "model.safetensors"
    torch.save({"x": torch.zeros(1)}, pickled / "text_encoder" / "pytorch_model.bin")  # written, never read
    weights.unlink()
    with pytest.raises(ConfigError, match=r"text_encoder: its weights are only in pytorch_model\.bin, a pickle"):
        load_pipeline_encoder(pickled)
    untokenized = shutil.copytree(folders["sd3"], tmp_path / "untokenized")
    shutil.rmtree(untokenized / "tokenizer_2")
    with pytest.raises(ConfigError, match=r"no tokenizer files in .*tokenizer_2 .*of its text_encoder_2"):
        load_pipeline_encoder(untokenized)
    broken = shutil.copytree(folders["pixart"], tmp_path / "broken")
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "text_encoder" / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, broken / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"broken/text_encoder/model\.safetensors: .*holds 1 non-finite"):
        load_pipeline_encoder(broken)
    other = shutil.copytree(folders["pixart"], tmp_path / "other")
    _edit_json(other / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(ConfigError, match="names no pipeline class whose prompts scm encodes"):
        load_pipeline_encoder(other)
    assert load_text_encoder(str(other)).spec["kind"] == "transformers"  # other pipelines: their text_encoder/


# -- scm data encode --pipeline --------------------------------------------------------------------------------------
def _captioned_folder(root, size: int, n: int = 3):
    captions = ["a red disc", "a small grey square\ntwo things", "a photo of a cat"][:n]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i, text in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(text)
    return root, [t.splitlines() for t in captions]


@pytest.mark.parametrize("family", ["pixart", "sd3", "sana"])
def test_cli_encode_with_a_pipeline(family, folders, tmp_path):
    folder, size = folders[family], IMAGE_SIZES[family]
    src, captions = _captioned_folder(tmp_path / "images", size)
    code, out = cli("data", "encode", "--pipeline", folder, "--data", src, "--out", tmp_path / "e", "--no-progress",
                    "--dtype", "float32")
    assert code == 0, out
    data = load_dataset(tmp_path / "e")
    enc = load_pipeline_encoder(folder)
    assert data.text["encoder"] == enc.spec and data.text["max_tokens"] == enc.max_tokens
    vae = diffusers.DiffusionPipeline.from_pretrained(folder).vae
    shift, scale = vae.config.get("shift_factor") or 0.0, vae.config.scaling_factor
    info = data.latent
    assert info["normalization"] == "vae" and info["vae"] == str((folder / "vae").resolve())
    assert np.allclose(info["mean"], shift) and np.allclose(info["std"], 0.5 / scale)
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(src / f"{i}.png"))).permute(2, 0, 1)
                          for i in range(3)]).float() / 127.5 - 1
    with torch.no_grad():
        encoded = vae.encode(pixels)
    z = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent
    x, cond = data.batch(torch.arange(3))
    assert torch.allclose(x, (z - shift) * scale, atol=1e-5)  # what the pipeline's network was trained on
    flat = [c for caps in captions for c in caps]  # encoded together, in one batch
    first = [flat.index(caps[0]) for caps in captions]  # what data.batch gives without a caption generator
    want = enc.encode(flat)
    assert torch.equal(cond["text"], want.tokens[first]) and torch.equal(cond["text_mask"], want.mask[first])
    assert (want.pooled is None) == ("text_pooled" not in cond)
    assert want.pooled is None or torch.equal(cond["text_pooled"], want.pooled[first])
    assert torch.equal(data.null_text()["text"], enc.encode([""]).tokens)  # the unconditional input


def test_cli_pipeline_excludes_the_encoder_and_vae_flags(folders, tmp_path):
    src, _ = _captioned_folder(tmp_path / "images", 16, n=1)
    for flags in (["--vae", folders["pixart"]], ["--text-encoder", "builtin"]):
        code, out = cli("data", "encode", "--pipeline", folders["pixart"], *flags, "--data", src, "--out",
                        tmp_path / "x")
        assert code == 2 and f"leave out {flags[0]}" in out
    code, out = cli("data", "encode", "--pipeline", folders["pixart"], "--normalization", "sd-vae-ft-mse", "--data",
                    src, "--out", tmp_path / "x")
    assert code == 2 and "leave out --normalization" in out
    sana_src, _ = _captioned_folder(tmp_path / "sana_images", 32, n=1)
    code, out = cli("data", "encode", "--pipeline", folders["sana"], "--sample", "--data", sana_src, "--out",
                    tmp_path / "x")
    assert code == 2 and "--sample" in out and "AutoencoderDC" in out and not (tmp_path / "x").exists()
    code, out = cli("data", "encode", "--pipeline", tmp_path / "images", "--data", src, "--out", tmp_path / "y")
    assert code == 2 and "--pipeline" in out and "no model_index.json" in out and not (tmp_path / "y").exists()
