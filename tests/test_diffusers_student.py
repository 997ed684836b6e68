"""diffusers networks as sCM students (scm.diffusers.net, scm.diffusers.jvp): small random UNet2DModel (with attention
and GroupNorm), UNet2DConditionModel (cross-attention) and DiTTransformer2DModel (class-conditional, learned sigma),
built from configs (nothing downloaded).

1. diffusers' own processors (AttnProcessor2_0 / AttnProcessor) under scm's exact attention give what they gave, and
   enable_jvp leaves whole models' outputs and state dicts as they were; key padding masks are honoured, other masks
   refused; the GroupNorm and timestep-embedding fixes are exact.
2. A fresh student is its teacher (the Parameterization-wrapped F, at any guidance scale), with a w_φ head and a
   zero guidance embedding; the teacher is left untouched.
3. The student's JVP (scm.tangents' path, forward_ad and torch.func) equals float64 central finite differences.
4. A run's config.json round-trips the network config: load_run rebuilds the same network via the registry.
5. sCD steps with the student run and change its weights (the w head and the guidance embedding included).
"""

import copy
import dataclasses
import json
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scm.config import TrainConfig, from_dict, to_dict
from scm.errors import ConfigError, MissingDependency
from scm.objectives import ConsistencyLoss
from scm.runs import RunDir, ema_key, load_run
from scm.tangents import jvp_tangent

from conftest import central_difference, jvp_both

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

from scm.diffusers import DiffusersNet, DiffusersNetConfig, enable_jvp, from_diffusers, student_from_diffusers  # noqa: E402
from scm.diffusers.jvp import ContiguousGroupNorm  # noqa: E402
from scm.nets.registry import build_net  # noqa: E402

SD = 0.5
D = torch.float64


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8).eval()


def _unet_cond():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4).eval()


def _dit():
    torch.manual_seed(0)  # class-conditional (10 classes and a "no class" row), learned sigma (8 = 2 × 4 channels)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10).eval()


# name → (model, scheduler, conditioning of a batch of 2)
CASES = {
    "unet": (_unet, lambda: diffusers.DDPMScheduler(prediction_type="v_prediction"), lambda: {}),
    "unet_cond": (_unet_cond, lambda: diffusers.EulerDiscreteScheduler(prediction_type="epsilon"),
                  lambda: {"encoder_hidden_states": torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))}),
    "dit": (_dit, lambda: diffusers.DDPMScheduler(), lambda: {"labels": torch.tensor([3, 7])}),
}


def _case(name, **kw):
    make_model, make_scheduler, make_cond = CASES[name]
    model, scheduler = make_model(), make_scheduler()
    return model, scheduler, student_from_diffusers(model, scheduler, sigma_d=SD, **kw), make_cond()


def _inputs(net, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, r = net.cfg.img_channels, net.cfg.img_resolution
    return torch.randn(2, c, r, r, generator=g, dtype=dtype), torch.tensor([0.4, 1.2], dtype=dtype)


def _to(cond, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}


def _close(a, b, rel):
    """max |a − b| ≤ rel · max |b|."""
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err <= rel, f"relative error {err:.3g} > {rel:.3g}"
    return err


# -- 1. the JVP attention processor and enable_jvp ---------------------------------------------------------------
ATTENTIONS = {  # the features of UNet2DModel's, UNet2DConditionModel's and DiT's attention modules
    "unet_spatial": (dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                          rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True),
                     (2, 16, 3, 3), None),
    "cross": (dict(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4, cross_attention_norm="layer_norm"),
              (2, 6, 16), (2, 5, 12)),
    "qk_norm": (dict(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm", bias=True), (2, 6, 16), None),
    "unscaled": (dict(query_dim=16, heads=2, dim_head=8, scale_qk=False), (2, 6, 16), None),  # AttnProcessor
}


@pytest.mark.parametrize("name", ATTENTIONS)
def test_jvp_processor_reproduces_diffusers_attention(name):
    kwargs, shape, ctx_shape = ATTENTIONS[name]
    torch.manual_seed(0)
    attn = Attention(**kwargs).eval()
    with torch.no_grad():  # GroupNorm / LayerNorm affine parameters away from (1, 0)
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert isinstance(attn.processor, AttnProcessor if name == "unscaled" else AttnProcessor2_0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    ctx = None if ctx_shape is None else torch.randn(ctx_shape, generator=g)
    for dtype, rel in ((torch.float32, 1e-5), (D, 1e-13)):
        ref = copy.deepcopy(attn).to(dtype)
        ours = enable_jvp(copy.deepcopy(attn).to(dtype))
        base = AttnProcessor if name == "unscaled" else AttnProcessor2_0
        assert isinstance(ours.processor, base) and type(ours.processor).__name__ == "Exact" + base.__name__
        xd, cd = x.to(dtype), None if ctx is None else ctx.to(dtype)
        with torch.no_grad():
            # fp32: the two attention kernels sum in different orders (a few ulp of O(1) values, through a
            # softmax and two projections); float64: the same function to rounding.
            _close(ours(xd, encoder_hidden_states=cd), ref(xd, encoder_hidden_states=cd), rel)
    # … and forward-mode AD goes through it (diffusers' SDPA processor has no forward-AD rule)
    ours = enable_jvp(copy.deepcopy(attn).double())
    fn = (lambda a: ours(a)) if ctx is None else (lambda a, c: ours(a, encoder_hidden_states=c))
    primals = (x.double(),) if ctx is None else (x.double(), ctx.double())
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=D) for p in primals)
    _close(jvp_both(fn, primals, tangents), central_difference(fn, primals, tangents), 1e-7)


def test_exact_attention_honours_padding_masks_and_refuses_others():
    torch.manual_seed(0)
    ref = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).double().eval()
    attn = enable_jvp(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 3, 8, generator=g, dtype=D), torch.randn(2, 5, 6, generator=g, dtype=D)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=D)  # diffusers' form: 1 real token, 0 padding
    bias = (1 - keep)[:, None, :] * -10000.0  # what PixArt and Sana make of it
    with torch.no_grad():  # e^-10000 is 0 in float64 as in every float type: the same function
        _close(attn(x, ctx, attention_mask=bias), ref(x, ctx, attention_mask=bias), 1e-13)
        # … and the same as attending to the real tokens alone
        alone = attn(x[:1], ctx[:1, :3])
        _close(attn(x, ctx, attention_mask=bias)[:1], alone, 1e-13)
    # the tangent through the masked attention matches a central difference; padding tokens get none
    fn = lambda a, c: attn(a, c, attention_mask=bias)  # noqa: E731
    tangents = (torch.randn(x.shape, generator=g, dtype=D), torch.randn(ctx.shape, generator=g, dtype=D))
    _close(jvp_both(fn, (x, ctx), tangents), central_difference(fn, (x, ctx), tangents), 1e-7)
    with pytest.raises(NotImplementedError, match="padding mask"):  # a bias that is not a padding mask
        attn(x, ctx, attention_mask=torch.full((2, 1, 5), -1.0, dtype=D))
    with pytest.raises(NotImplementedError, match="key padding"):  # one mask row per query
        attn(x, ctx, attention_mask=torch.zeros(2, 3, 5, dtype=D))


def test_enable_jvp_refuses_processors_it_cannot_differentiate():
    class Custom:
        def __call__(self, attn, hidden_states, **kw):
            return hidden_states

    other = Attention(query_dim=8, heads=2, dim_head=4)
    other.set_processor(Custom())
    with pytest.raises(NotImplementedError, match="Custom"):
        enable_jvp(other)


@pytest.mark.parametrize("name", CASES)
def test_enable_jvp_keeps_weights_and_outputs(name):
    make_model, _, make_cond = CASES[name]
    model = make_model()
    cond = make_cond()
    labels = cond.pop("labels", None)
    if labels is not None:
        cond["class_labels"] = labels
    size, channels = model.config.sample_size, model.config.in_channels
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(2))
    timestep = torch.tensor([10.5, 700.25])
    ours = enable_jvp(copy.deepcopy(model))
    assert list(ours.state_dict()) == list(model.state_dict())
    assert any(isinstance(m, ContiguousGroupNorm) for m in ours.modules()) == (name != "dit")  # DiT: LayerNorm only
    with torch.no_grad():
        _close(ours(x, timestep, **cond).sample, model(x, timestep, **cond).sample, 1e-5)


def test_groupnorm_and_timestep_fixes():
    # GroupNorm's forward-AD formula fails on a channels-last primal; ContiguousGroupNorm's does not, and is exact
    gn = torch.nn.GroupNorm(2, 8).double()
    x = torch.randn(2, 8, 3, 3, dtype=D).contiguous(memory_format=torch.channels_last)
    tx = torch.randn(2, 8, 3, 3, dtype=D)
    fixed = copy.deepcopy(gn)
    fixed.__class__ = ContiguousGroupNorm
    _close(jvp_both(fixed, (x,), (tx,)), central_difference(gn, (x,), (tx,)), 1e-8)
    _close(fixed(x), gn(x), 1e-14)  # the same values (the channels-last kernel sums in another order)
    # under CPU bf16 autocast (which leaves GroupNorm alone) the value and its tangent keep the input's type
    fp = copy.deepcopy(fixed).float()
    xb, tb = x.float().to(torch.bfloat16), tx.float().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), fwAD.dual_level():
        out = fwAD.unpack_dual(fp(fwAD.make_dual(xb, tb)))
    assert out.primal.dtype == out.tangent.dtype == torch.bfloat16
    # Timesteps: bit-identical to diffusers' in float32, float64 for float64 timesteps
    from diffusers.models.embeddings import Timesteps

    ts = Timesteps(32, flip_sin_to_cos=True, downscale_freq_shift=1)
    wide = enable_jvp(torch.nn.Sequential(copy.deepcopy(ts)))[0]
    assert type(wide).__name__ == "WideTimesteps" and isinstance(wide, Timesteps)
    s = torch.tensor([0.0, 3.7, 512.25, 999.0])
    assert torch.equal(wide(s), ts(s))
    assert wide(s.double()).dtype == D
    _close(wide(s.double()).float(), ts(s), 1e-4)  # float32 rounding of sin/cos(999·ω)
    # RMSNorm (its variance in float32 whatever the input): bit-identical in float32, float64 for float64 inputs
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    ours = enable_jvp(torch.nn.Sequential(copy.deepcopy(norm)))[0]
    assert type(ours).__name__ == "WideRMSNorm" and isinstance(ours, RMSNorm)
    h = torch.randn(3, 16)
    assert torch.equal(ours(h), norm(h))
    h64 = h.double()
    exact = h64 * torch.rsqrt(h64.square().mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert ours.double()(h64).dtype == D and (ours(h64) - exact).abs().max() < 1e-15  # no float32 step left
    th = torch.randn(3, 16, dtype=D)
    _close(jvp_both(ours, (h64,), (th,)), central_difference(ours, (h64,), (th,)), 1e-8)


# -- 2. a fresh student is its teacher -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_fresh_student_equals_its_teacher(name):
    model, scheduler, net, cond = _case(name, guidance_embed=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = from_diffusers(model, scheduler, sigma_d=SD)
    x, t = _inputs(net)
    net.eval()
    with torch.no_grad():
        ref = teacher(x, t, **cond)
        for g in (1.0, 3.5):  # the zero-initialised guidance embedding changes nothing at any scale
            F, w = net(x, t, guidance=g, return_weight=True, **cond)
            # fp32: scm's attention vs SDPA (different summation orders), a few ulp through the network
            _close(F, ref, 1e-5)
    assert w.shape == (2,) and torch.isfinite(w).all()
    assert net.guidance_linear is not None and not net.guidance_linear.weight.any()
    assert net.num_parameters() > sum(p.numel() for p in model.parameters())
    # the teacher is untouched: same weights, its own processors and modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules() if isinstance(m, Attention))
    assert not any(isinstance(m, ContiguousGroupNorm) for m in model.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_student_conditioning_and_errors():
    model, scheduler, net, _ = _case("dit", label_dropout=0.5)
    assert (net.cfg.label_dim, net.null_label) == (10, 10)
    x, t = _inputs(net)
    net.eval()
    with torch.no_grad():
        null = net(x, t)  # no labels: the model's "no class" row
        assert torch.equal(net(x, t, labels=torch.zeros(2, 10)), null)  # zero one-hot rows: no class
        assert torch.equal(net(x, t, labels=torch.tensor([10, -1])), null)  # outside [0, 10): no class
        onehot = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
        assert torch.equal(net(x, t, labels=onehot), net(x, t, labels=torch.tensor([3, 7])))
        net.train()  # label dropout (drawn from the global RNG): with p = 0.5, some rows of 64 are dropped
        xs, ts = x.repeat(32, 1, 1, 1), t.repeat(32)
        torch.manual_seed(0)
        F_train = net(xs, ts, labels=torch.full((64,), 3))
        net.eval()
        F_cond, F_null = net(xs, ts, labels=torch.full((64,), 3)), net(xs, ts)
        dropped = (F_train - F_null).flatten(1).abs().amax(1) < 1e-6
        kept = (F_train - F_cond).flatten(1).abs().amax(1) < 1e-6
        assert (dropped ^ kept).all() and 10 < dropped.sum() < 54
    # the model's own label dropout is off (the config's label_dropout decides)
    assert all(m.dropout_prob == 0 for m in net.modules() if type(m).__name__ == "LabelEmbedding")
    with pytest.raises(ConfigError, match="label_dim"):
        student_from_diffusers(model, scheduler, sigma_d=SD, label_dim=11)
    with pytest.raises(ConfigError, match="no 'no class'"):
        student_from_diffusers(_unet_with_classes(), scheduler, sigma_d=SD, label_dropout=0.1)
    with pytest.raises(ConfigError, match="UNet1DModel is not a network scm can train as a student"):
        student_from_diffusers(diffusers.UNet1DModel(), scheduler, sigma_d=SD)
    with pytest.raises(ConfigError, match="model_class"):
        build_net(DiffusersNetConfig(), SD)  # the "diffusers" preset's placeholder: no model yet
    with pytest.raises(ConfigError, match="not a network scm can train"):
        DiffusersNetConfig(model_class="HunyuanDiT2DModel")


def _unet_with_classes():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2,
                                 layers_per_block=1, norm_num_groups=4, num_class_embeds=5)


def test_without_diffusers_a_missing_dependency_names_the_extra(monkeypatch):
    _, _, net, _ = _case("unet")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingDependency) as e:
        build_net(net.cfg, SD)
    assert e.value.extra == "diffusers"


# -- 3. the JVP against float64 finite differences -------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_student_jvp_matches_float64_finite_differences(name):
    """Float64 central differences with h = 1e-6: rounding ≈ 1e-16·|F|/h ≈ 1e-10, truncation h²·|F'''|/6, where
    the teacher's timestep (a DDPM index up to ~1000, ~10³ per radian of t) makes |F'''| in t large (measured
    errors: ~1e-8 relative, scaling as h²). Tolerance 1e-6 relative to max |JVP|: a wrong or missing tangent path
    (attention, a norm, the time embedding, the guidance hook) gives errors of order 1."""
    _, _, net, cond = _case(name, guidance_embed=True)
    net = net.double().eval()
    with torch.no_grad():  # make the guidance path non-trivial, so its hook's tangent is tested too
        net.guidance_linear.weight.normal_(0, 0.1)
    cond = _to(cond, D)
    x, t = _inputs(net, D)
    g = torch.Generator().manual_seed(5)
    dxdt = torch.randn(x.shape, generator=g, dtype=D)
    fn = lambda u, s, **c: net(u, s, guidance=2.0, **c)  # noqa: E731
    # scm.tangents' path (the rearranged tangent of §5.1, as training takes it), both engines
    _, ref = jvp_tangent(fn, SD * x, t, dxdt, SD, method="finite_difference", fd_step=1e-6, **cond)
    for method in ("forward_ad", "func"):
        _, JF = jvp_tangent(fn, SD * x, t, dxdt, SD, method=method, **cond)
        _close(JF, ref, 1e-6)
    # the x and t directions one at a time, with the adaptive weight's tangent (a function of t only)
    for tx, tt in ((dxdt, torch.zeros_like(t)), (torch.zeros_like(x), torch.ones_like(t))):
        def both(u, s):
            return torch.cat([a.flatten() for a in net(u, s, guidance=2.0, return_weight=True, **cond)])
        _close(jvp_both(both, (x, t), (tx, tt)), central_difference(both, (x, t), (tx, tt)), 1e-6)


# -- 4. a run's config round-trips the network ------------------------------------------------------------------------
def test_run_config_round_trip_rebuilds_the_same_network(tmp_path):
    _, _, net, cond = _case("dit", guidance_embed=True, label_dropout=0.1)
    with torch.no_grad():
        for p in net.parameters():  # trained-looking weights, the heads included
            p.add_(0.01 * torch.randn_like(p))
    cfg = TrainConfig(method="scd", teacher="diffusers:/nowhere", resolution=8, channels=4, conditional=True,
                      net_preset="diffusers", net=net.cfg, loss=ConsistencyLoss(guidance=(1.0, 3.0)))
    cfg.validate()
    text = json.dumps(to_dict(cfg))
    back = from_dict(json.loads(text))
    assert back.net == net.cfg and isinstance(back.net, DiffusersNetConfig)
    run = RunDir(tmp_path / "run")
    run.write_config(json.loads(text))
    weights = net.state_dict()
    run.save(1, {"net": weights, "ema": {ema_key(cfg.ema.stds[0], k): v for k, v in weights.items()}},
             {"step": 1}, keep=1)
    loaded = load_run(run.path)
    assert isinstance(loaded.net, DiffusersNet)
    x, t = _inputs(net)
    net.eval()
    with torch.no_grad():
        for g in (1.0, 2.5):
            assert torch.equal(loaded.net(x, t, guidance=g, return_weight=True, **cond)[0],
                               net(x, t, guidance=g, return_weight=True, **cond)[0])
        assert torch.equal(loaded.net.weight(t), net.weight(t))
    # the training-time fields a student may change keep the weights loadable
    changed = build_net(dataclasses.replace(back.net, label_dropout=0.0, guidance_embed=False, dropout=0.1), SD)
    missing, unexpected = changed.load_state_dict(weights, strict=False)
    assert not missing and all("guidance" in k for k in unexpected)


# -- 5. sCD steps ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fused", [("dit", True), ("unet", False)])
def test_scd_steps_with_the_student_change_its_weights(name, fused):
    model, scheduler, net, cond = _case(name, guidance_embed=name == "dit")
    teacher = from_diffusers(model, scheduler, sigma_d=SD)
    guidance = (1.0, 3.0) if name == "dit" else None
    loss_fn = ConsistencyLoss(sigma_d=SD, guidance=guidance, warmup_kimg=0.0, fused_pass=fused,
                              teacher=teacher, teacher_uncond={"labels": None})
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = SD * torch.randn(4, net.cfg.img_channels, 8, 8, generator=g)
    cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    net.train()
    for _ in range(2):
        loss, stats = loss_fn(net, x0, 1.0, generator=g, **cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.normalize_weights_()
        assert torch.isfinite(loss) and torch.isfinite(stats["g_norm"])
    changed = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert "weight_linear.weight" in changed
    assert any(k.startswith("model.") for k in changed)
    if name == "dit":
        assert "guidance_linear.weight" in changed  # zero-initialised, but with a gradient
    assert net._guidance is None  # the guidance vector lives only during a forward
