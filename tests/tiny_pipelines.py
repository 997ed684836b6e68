"""Tiny random diffusers text-to-image pipelines, saved as folders that diffusers' own pipeline classes load
(`from_pretrained(folder)`), offline: nothing is downloaded. A helper module for tests, not a test file.

    build_pipeline("sd3", tmp_path / "sd3")   # → the folder, with model_index.json and one folder per component

Five families (`FAMILIES`), each with the components its pipeline class takes and the conventions its
`encode_prompt` relies on, at toy sizes (token widths 8–32, 16-token prompts, 16×16 images, 8×8 latents; a folder
is a few hundred kB and takes about a second to build):

| family | pipeline | network | VAE | scheduler | text encoders |
|---|---|---|---|---|---|
| sd3 | StableDiffusion3Pipeline | SD3Transformer2DModel | KL, 16 ch, shift | FlowMatchEuler | CLIP+proj ×2, T5 |
| flux | FluxPipeline | FluxTransformer2DModel (guidance) | KL, 16 ch, shift | FlowMatchEuler, dynamic | CLIP, T5 |
| sana | SanaPipeline | SanaTransformer2DModel | DC | DPM-Solver, flow | Gemma2 |
| pixart | PixArtSigmaPipeline | PixArtTransformer2DModel (σ) | KL, 4 ch | DPM-Solver, ε | T5 |
| sdxl | StableDiffusionXLPipeline | UNet2DConditionModel | KL, 4 ch | Euler, ε | CLIP, CLIP+proj |

Tokenizers are built offline with the `tokenizers` models behind transformers' own classes (`CLIPTokenizer`: byte-level
BPE with "</w>" word ends; `T5Tokenizer`: Unigram over "▁"-prefixed pieces; `GemmaTokenizer`: BPE over "▁"-joined
text): a vocabulary of single characters (so any caption tokenizes) plus whole-word merges or pieces for `WORDS`.
Their conventions are the real ones: CLIP's start/end tokens have the two highest ids and its text configs record
the legacy eos_token_id 2 (pooling at the argmax id, the end token), the first CLIP tokenizer pads with its end
token and the second (SD3's and SDXL's tokenizer_2) with "!" (id 0); T5 appends "</s>" (id 1) and pads with
"<pad>" (id 0); Gemma prepends "<bos>" and pads on the left unless told otherwise (Sana's pipeline sets the right).
Every tokenizer's model_max_length is `MAX_LENGTH` (16), so the pipelines' max_sequence_length is capped there.

The networks' configs are module constants (`SD3_TRANSFORMER`, `FLUX_TRANSFORMER`, `SANA_TRANSFORMER`,
`PIXART_TRANSFORMER`, `SDXL_UNET`), so other tests build the same networks; weights are random (seeded).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

__all__ = ["FAMILIES", "FLUX_TRANSFORMER", "IMAGE_SIZES", "MAX_LENGTH", "PIXART_TRANSFORMER", "SANA_TRANSFORMER",
           "SD3_TRANSFORMER", "SDXL_UNET", "WORDS", "build_pipeline", "clip_tokenizer", "gemma_tokenizer",
           "t5_tokenizer"]

FAMILIES = ("sd3", "flux", "sana", "pixart", "sdxl")
MAX_LENGTH = 16   # every tokenizer's model_max_length (and CLIP's position table)
IMAGE_SIZES = {"sd3": 16, "flux": 16, "sana": 32, "pixart": 16, "sdxl": 16}  # pixels: 8×8 latents for each VAE
WORDS = ("a", "an", "the", "of", "on", "in", "and", "with", "photo", "painting", "cat", "dog", "bird", "red", "blue",
         "green", "grey", "big", "small", "square", "disc", "shape", "item", "sky", "sea", "over", "mat", "two",
         "things", "one", "more", "nothing", "at", "all")
_CHARS = string.ascii_letters + string.digits + ",.:;'\"-?()"

# widths of the text encoders (token width, pooled width) — the networks below take exactly these
CLIP_L = {"hidden_size": 8, "projection_dim": 8}      # SD3's text_encoder, Flux's, SDXL's text_encoder
CLIP_G = {"hidden_size": 12, "projection_dim": 12}    # SD3's and SDXL's text_encoder_2
T5_WIDTH, GEMMA_WIDTH = 32, 16

SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                       pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"], out_channels=16,
                       pos_embed_max_size=16)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                        pooled_projection_dim=CLIP_L["hidden_size"], guidance_embeds=True, axes_dims_rope=(2, 2, 4))
SANA_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                        caption_channels=GEMMA_WIDTH, sample_size=8, patch_size=1)
PIXART_TRANSFORMER = dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                          in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=T5_WIDTH,
                          use_additional_conditions=False)
SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=4,
                 cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=CLIP_G["projection_dim"] + 6 * 4)

_KL = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
           sample_size=16)
VAES = {  # SD3's and Flux's 16-channel VAEs have no quant convs and a shift; SDXL's (also PixArt-Σ's) 4 channels
    "sd3": dict(_KL, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                shift_factor=0.0609),
    "flux": dict(_KL, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                 shift_factor=0.1159),
    "pixart": dict(_KL, latent_channels=4, scaling_factor=0.13025),
    "sdxl": dict(_KL, latent_channels=4, scaling_factor=0.13025),
    "sana": dict(in_channels=3, latent_channels=4, attention_head_dim=4,  # three blocks: Sana wants 32-px images
                 encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                 decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                 encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                 encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                 encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                 scaling_factor=0.41407),
}


# -- tokenizers -----------------------------------------------------------------------------------------------------
def _chain(symbols: list[str], vocab: dict[str, int], merges: dict[tuple[str, str], None]) -> None:
    """Merges joining `symbols` left to right into one token (each intermediate joins the vocabulary)."""
    current = symbols[0]
    for s in symbols[1:]:
        merges.setdefault((current, s), None)
        current += s
        vocab.setdefault(current, len(vocab))


def clip_tokenizer(pad: str = "<|endoftext|>"):
    """A CLIPTokenizer: byte-level BPE over lower-case characters with "</w>" word ends, whole words of `WORDS`;
    "!" is id 0 and the start/end tokens the two highest ids, as in CLIP's vocabulary."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"!": 0, "!</w>": 1}
    for c in dict.fromkeys(_CHARS.lower()):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: dict[tuple[str, str], None] = {}
    for w in WORDS:
        if len(w) > 1:
            _chain([*w[:-1], w[-1] + "</w>"], vocab, merges)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), pad_token=pad, model_max_length=MAX_LENGTH)


def t5_tokenizer():
    """A T5Tokenizer: Unigram over "▁word" pieces of `WORDS` and single characters; <pad> 0, </s> 1, <unk> 2."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -10.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_LENGTH)


def gemma_tokenizer():
    """A GemmaTokenizer: BPE over characters and "▁" (spaces), whole words of `WORDS` with and without their "▁";
    <pad> 0, <eos> 1, <bos> 2 (prepended), padding on the left as Gemma's tokenizer ships."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5, "\n": 6}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    merges: dict[tuple[str, str], None] = {}
    for w in WORDS:
        _chain(["▁", *w], vocab, merges)
        if len(w) > 1:
            _chain(list(w), vocab, merges)
    return GemmaTokenizer(vocab=vocab, merges=list(merges), add_bos_token=True, padding_side="left",
                          model_max_length=MAX_LENGTH)


# -- text encoders ---------------------------------------------------------------------------------------------------
def _clip(tokenizer, widths: dict, projection: bool):
    import transformers as tf

    config = tf.CLIPTextConfig(vocab_size=len(tokenizer), intermediate_size=16, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=0,
                               pad_token_id=1, eos_token_id=2, **widths)  # eos 2: pooled at the argmax id, as SD's
    return (tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel)(config)


def _t5(tokenizer):
    import transformers as tf

    config = tf.T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16,
                         feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tf.T5EncoderModel(config)


def _gemma2(tokenizer):
    import transformers as tf

    config = tf.Gemma2Config(vocab_size=len(tokenizer), hidden_size=GEMMA_WIDTH, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return tf.Gemma2Model(config)


# -- pipelines -------------------------------------------------------------------------------------------------------
def _sd3(d):
    clip_l, clip_g, t5 = clip_tokenizer(), clip_tokenizer(pad="!"), t5_tokenizer()
    return d.StableDiffusion3Pipeline(
        transformer=d.SD3Transformer2DModel(**SD3_TRANSFORMER), scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=d.AutoencoderKL(**VAES["sd3"]), text_encoder=_clip(clip_l, CLIP_L, True), tokenizer=clip_l,
        text_encoder_2=_clip(clip_g, CLIP_G, True), tokenizer_2=clip_g, text_encoder_3=_t5(t5), tokenizer_3=t5)


def _flux(d):
    clip_l, t5 = clip_tokenizer(), t5_tokenizer()
    scheduler = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return d.FluxPipeline(
        transformer=d.FluxTransformer2DModel(**FLUX_TRANSFORMER), scheduler=scheduler,
        vae=d.AutoencoderKL(**VAES["flux"]), text_encoder=_clip(clip_l, {"hidden_size": CLIP_L["hidden_size"]},
                                                                 False),
        tokenizer=clip_l, text_encoder_2=_t5(t5), tokenizer_2=t5)


def _sana(d):
    gemma = gemma_tokenizer()
    scheduler = d.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                              solver_order=2, algorithm_type="dpmsolver++")
    return d.SanaPipeline(transformer=d.SanaTransformer2DModel(**SANA_TRANSFORMER), scheduler=scheduler,
                          vae=d.AutoencoderDC(**VAES["sana"]), text_encoder=_gemma2(gemma), tokenizer=gemma)


def _pixart(d):
    t5 = t5_tokenizer()
    return d.PixArtSigmaPipeline(transformer=d.PixArtTransformer2DModel(**PIXART_TRANSFORMER),
                                 scheduler=d.DPMSolverMultistepScheduler(), vae=d.AutoencoderKL(**VAES["pixart"]),
                                 text_encoder=_t5(t5), tokenizer=t5)


def _sdxl(d):
    clip_l, clip_g = clip_tokenizer(), clip_tokenizer(pad="!")
    scheduler = d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1)
    return d.StableDiffusionXLPipeline(
        unet=d.UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler, vae=d.AutoencoderKL(**VAES["sdxl"]),
        text_encoder=_clip(clip_l, {"hidden_size": CLIP_L["hidden_size"]}, False), tokenizer=clip_l,
        text_encoder_2=_clip(clip_g, CLIP_G, True), tokenizer_2=clip_g, add_watermarker=False)


_BUILDERS = {"sd3": _sd3, "flux": _flux, "sana": _sana, "pixart": _pixart, "sdxl": _sdxl}


def build_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny random pipeline of `family` (one of `FAMILIES`; weights drawn with `seed`) and save it at
    `folder` (safetensors weights); return the folder."""
    import diffusers

    if family not in _BUILDERS:
        raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe = _BUILDERS[family](diffusers)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
