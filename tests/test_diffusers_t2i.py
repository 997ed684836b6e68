"""diffusers' text-to-image networks as sCM teachers and students (scm.diffusers.families): PixArt (cross-attention with
a padding mask, learned sigma, VP ε), SD3 (joint attention, pooled prompt, rectified flow), Flux (packed latents,
rotary position ids, its own guidance embedder, rectified flow), Sana (linear attention, masked cross-attention,
flow) and SDXL's U-Net (text_embeds and size conditions, VP ε); tiny random configs, nothing downloaded.

1. The teacher's F is the model's own prediction, called as its pipeline calls it (the reference below is written
   from the pipelines: Flux's packing and timestep / 1000, SD3's timestep = 1000·σ, PixArt's mask, SDXL's time ids),
   converted by the parameterisation's algebra (tested in closed form in test_diffusers_teacher.py).
2. A fresh student equals its teacher at every guidance scale (a zero-initialised guidance input: scm's, or the
   model's own guidance embedder for Flux and Sana, so the student stays a diffusers class its pipelines load).
3. The student's JVP (forward_ad and torch.func) equals a float64 central difference through padded prompts.
"""

import pytest
import torch

from scm.diffusers.convert import Parameterization
from scm.errors import ConfigError
from scm.tangents import jvp_tangent

from conftest import central_difference, jvp_both

diffusers = pytest.importorskip("diffusers")

from scm.diffusers import from_diffusers, student_from_diffusers  # noqa: E402
from scm.diffusers.families import FAMILIES, family_of  # noqa: E402
from scm.diffusers.net_config import SUPPORTED_MODELS  # noqa: E402

SD = 0.5
D = torch.float64
B, T, WIDTH, POOLED = 2, 5, 12, 8
MASK = torch.tensor([[True, True, True, False, False], [True] * 5])  # the first prompt has two padding tokens


def _pixart():
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=WIDTH, use_additional_conditions=False,
        norm_num_groups=1)


def _sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=WIDTH, caption_projection_dim=16, pooled_projection_dim=POOLED, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))


def _flux(guidance_embeds):
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=WIDTH, pooled_projection_dim=POOLED, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4))


def _sana():
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=WIDTH,
        sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads")


def _sdxl():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=(2, 4), norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=POOLED + 6 * 4, use_linear_projection=True)


def _flow():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


# name → (model, scheduler, shape (C, H, W), takes a mask, takes a pooled prompt)
CASES = {
    "pixart": (_pixart, lambda: diffusers.DPMSolverMultistepScheduler(), (4, 8, 8), True, False),
    "sd3": (_sd3, _flow, (4, 8, 8), False, True),
    "flux-dev": (lambda: _flux(True), _flow, (4, 8, 8), False, True),
    "flux-schnell": (lambda: _flux(False), _flow, (4, 8, 8), False, True),
    "sana": (_sana, lambda: diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                                                  use_flow_sigmas=True), (4, 8, 8), True, False),
    "sdxl": (_sdxl, lambda: diffusers.EulerDiscreteScheduler(), (4, 8, 8), False, True),
}


def _model(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = CASES[name][0]().to(dtype).eval()
    with torch.no_grad():  # zero-initialised output layers (adaLN-Zero, final projections) made non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _prompts(name, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = MASK if CASES[name][3] else torch.ones(B, T, dtype=torch.bool)
    cond = {"text": torch.randn(B, T, WIDTH, generator=g, dtype=dtype), "text_mask": mask}
    if CASES[name][4]:
        cond["text_pooled"] = torch.randn(B, POOLED, generator=g, dtype=dtype)
    return cond


def _inputs(name, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *CASES[name][2], generator=g, dtype=dtype), torch.tensor([0.4, 1.2], dtype=dtype)


def _close(a, b, rel):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err <= rel, f"relative error {err:.3g} > {rel:.3g}"
    return err


def test_the_families_are_the_supported_students():
    assert tuple(FAMILIES) == SUPPORTED_MODELS


# -- 1. the teacher calls each model as its pipeline does -------------------------------------------------------------
def _pipeline_prediction(name, model, x_in, timestep, cond, guidance=None):
    """The model's raw prediction for the teacher's input x_in at the scheduler's timestep, written the way each
    diffusers pipeline calls it (an independent reference for scm.diffusers.families)."""
    text, mask, pooled = cond["text"], cond["text_mask"], cond.get("text_pooled")
    if name == "pixart":  # PixArtSigmaPipeline: the T5 mask, no size conditions, learned sigma dropped
        out = model(x_in, encoder_hidden_states=text, encoder_attention_mask=mask.to(x_in.dtype), timestep=timestep,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out.chunk(2, dim=1)[0]
    if name == "sd3":  # StableDiffusion3Pipeline: timestep = 1000·σ, the pooled CLIP embeddings
        return model(x_in, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep).sample
    if name.startswith("flux"):  # FluxPipeline: 2×2-packed latents, position ids, timestep = σ (and guidance)
        b, c, h, w = x_in.shape
        packed = x_in.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        ids = torch.zeros(h // 2, w // 2, 3, dtype=x_in.dtype)
        ids[..., 1] += torch.arange(h // 2, dtype=x_in.dtype)[:, None]
        ids[..., 2] += torch.arange(w // 2, dtype=x_in.dtype)[None, :]
        out = model(packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep / 1000,
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text.shape[1], 3, dtype=x_in.dtype),
                    guidance=guidance).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    if name == "sana":  # SanaPipeline: the Gemma mask, timestep × timestep_scale (1)
        return model(x_in, encoder_hidden_states=text, encoder_attention_mask=mask.to(x_in.dtype),
                     timestep=timestep).sample
    h, w = 8 * x_in.shape[-2], 8 * x_in.shape[-1]  # SDXL: an uncropped image of that size
    ids = torch.tensor([[h, w, 0, 0, h, w]] * x_in.shape[0], dtype=x_in.dtype)
    return model(x_in, timestep, encoder_hidden_states=text,
                 added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


@pytest.mark.parametrize("name", CASES)
def test_teacher_calls_the_model_as_its_pipeline_does(name):
    model, scheduler = _model(name), CASES[name][1]()
    cond, (x, t) = _prompts(name), _inputs(name)
    guidance = torch.full((B,), 3.5) if name == "flux-dev" else None
    extra = {"guidance": guidance} if guidance is not None else {}
    fn = from_diffusers(model, scheduler, sigma_d=SD)
    with torch.no_grad():
        F = fn(x, t, **cond, **extra)
        param = Parameterization.from_scheduler(scheduler)
        x_in, timestep = param.model_inputs(x, t, SD)
        ref = param.trigflow_F(_pipeline_prediction(name, model, x_in, timestep, cond, guidance), x_in, t, SD)
    # the same model on the same inputs: equal but for the attention kernel (scm's blocked math in the teacher's
    # place? no: the teacher runs diffusers' own SDPA, the reference too), so to float32 rounding
    _close(F, ref, 1e-6)
    if name == "flux-dev":
        with pytest.raises(ConfigError, match="guidance"):
            fn(x, t, **cond)
    if CASES[name][4]:
        with pytest.raises(ConfigError, match="pooled"):
            fn(x, t, text=cond["text"], text_mask=cond["text_mask"])


def test_masked_prompt_tokens_do_not_count():
    """PixArt and Sana attend to the real tokens alone: changing what the padding holds changes nothing."""
    for name in ("pixart", "sana"):
        fn = from_diffusers(_model(name), CASES[name][1](), sigma_d=SD)
        cond, (x, t) = _prompts(name), _inputs(name)
        other = dict(cond, text=torch.where(MASK[..., None], cond["text"], 7.0))
        with torch.no_grad():
            _close(fn(x, t, **other), fn(x, t, **cond), 1e-6)
            assert not torch.allclose(fn(x, t, **dict(cond, text_mask=torch.ones(B, T, dtype=torch.bool))),
                                      fn(x, t, **cond))


# -- 2. a fresh student is its teacher ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_fresh_student_equals_its_teacher(name):
    model, scheduler = _model(name), CASES[name][1]()
    net = student_from_diffusers(model, scheduler, sigma_d=SD, guidance_embed=True, shape=CASES[name][2]).eval()
    family = family_of(model)
    own = family.native_guidance and family.time_embeddings is None
    assert net.cfg.guidance_embed and bool(net.cfg.model_config.get("guidance_embeds")) == bool(own)
    assert (net.cfg.text_dim, net.cfg.text_pooled_dim) == (WIDTH, POOLED if CASES[name][4] else 0)
    cond, (x, t) = _prompts(name), _inputs(name)
    teacher = from_diffusers(model, scheduler, sigma_d=SD, **({"guidance": 3.5} if name == "flux-dev" else {}))
    with torch.no_grad():
        ref = teacher(x, t, **cond)
        for s in (1.0, 3.5) if name != "flux-dev" else (3.5,):  # Flux-dev: its own guidance input, at 3.5
            _close(net(x, t, guidance=s, **cond), ref, 1e-5)  # scm's attention (blocked math) vs SDPA: fp32
        if own and name != "flux-dev":  # the switched-on embedder is zero: no scale changes anything
            _close(net(x, t, guidance=7.0, **cond), ref, 1e-5)


def test_students_without_a_data_shape_or_with_the_wrong_prompts_are_refused():
    with pytest.raises(ConfigError, match="data's shape"):
        from scm.diffusers.net import student_config

        student_config("FluxTransformer2DModel", dict(_flux(False).config), "FlowMatchEulerDiscreteScheduler",
                       dict(_flow().config))
    with pytest.raises(ConfigError, match="even"):
        student_config("FluxTransformer2DModel", dict(_flux(False).config), "FlowMatchEulerDiscreteScheduler",
                       dict(_flow().config), shape=(4, 7, 8))
    with pytest.raises(ConfigError, match="channels"):
        student_config("SD3Transformer2DModel", dict(_sd3().config), "FlowMatchEulerDiscreteScheduler",
                       dict(_flow().config), shape=(3, 8, 8))


# -- 3. exact JVP through padded prompts -------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_student_jvp_matches_float64_finite_differences(name):
    """Float64 central differences (h = 1e-6: rounding ≈ 1e-16·|F|/h ≈ 1e-10, truncation h²·|F'''|/6; the VP
    teachers' index time makes |F'''| in t large, ~1e-8 measured): tolerance 1e-6 relative to max |JVP|. A wrong or
    missing tangent path (masked or joint attention, rotary embeddings, RMS norms, the guidance input) is of order 1;
    halving h shows the remaining error is truncation."""
    model = _model(name, D)
    net = student_from_diffusers(model, CASES[name][1](), sigma_d=SD, guidance_embed=True,
                                 shape=CASES[name][2]).eval()
    with torch.no_grad():  # the guidance path made non-trivial, so its tangent is tested too
        for n, p in net.named_parameters():
            if "guidance" in n:
                p.normal_(0, 0.1)
    cond, (x, t) = _prompts(name, D), _inputs(name, D)
    g = torch.Generator().manual_seed(5)
    dxdt = torch.randn(x.shape, generator=g, dtype=D)
    fn = lambda u, s, **c: net(u, s, guidance=2.0, **c)  # noqa: E731
    _, ref = jvp_tangent(fn, SD * x, t, dxdt, SD, method="finite_difference", fd_step=1e-6, **cond)
    _, ref_half = jvp_tangent(fn, SD * x, t, dxdt, SD, method="finite_difference", fd_step=5e-7, **cond)
    for method in ("forward_ad", "func"):
        _, JF = jvp_tangent(fn, SD * x, t, dxdt, SD, method=method, **cond)
        err = _close(JF, ref, 1e-6)
        err_half = _close(JF, ref_half, 1e-6)
        assert err_half < 1e-9 or err_half < 0.6 * err or err < 1e-9  # truncation (∝ h²) or already at rounding
    # the prompt direction too (the tangent through cross / joint attention to the tokens)
    tx = torch.randn(cond["text"].shape, generator=g, dtype=D)

    def of_text(tokens):
        return net(x, t, guidance=2.0, **dict(cond, text=tokens))

    _close(jvp_both(of_text, (cond["text"],), (tx,)), central_difference(of_text, (cond["text"],), (tx,)), 1e-6)
