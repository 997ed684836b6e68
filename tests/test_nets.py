"""JVP-ready networks: every layer and the whole tiny U-Net against float64 finite differences, both
forward-AD engines, the attention JVP against autograd, preset sizes, shape errors, dropout masks."""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck

import scm.nets.attention as attn_mod
from scm._rng import rng_replayer
from scm.nets import NET_PRESETS, build_net, net_config
from scm.nets.attention import attention
from scm.nets.functional import clip, conv2d, lincomb, modulate, pixel_norm, scaled_cat, silu, upsample2x
from scm.nets.layers import FourierEmbedding, MPConv, PositionalEmbedding, adaptive_double_norm, mp_cat, mp_sum

from conftest import central_difference, jvp_both

D = torch.float64


def build_unet(preset: str, res, ch: int, **fields):
    """A U-Net preset for res (R or (H, W)) × ch inputs, at σ_d = 0.5."""
    return build_net(net_config(preset, img_resolution=res, img_channels=ch, **fields), 0.5)


def _rand(*shape, seed=0):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=D)


def _check_layer(fn, primals, seed=1):
    tangents = [_rand(*p.shape, seed=seed + i) for i, p in enumerate(primals)]
    jvp = jvp_both(fn, primals, tangents)
    torch.testing.assert_close(jvp, central_difference(fn, primals, tangents), atol=1e-7, rtol=1e-6)


# -- primitive ops: exact backward and forward AD (gradcheck compares both to finite differences) ----------
@pytest.mark.parametrize(
    "name,fn,shapes",
    [
        ("conv3x3", lambda x, w: conv2d(x, w, 1), [(2, 3, 5, 5), (4, 3, 3, 3)]),
        ("conv1x1", lambda x, w: conv2d(x, w, 0), [(2, 3, 4, 4), (5, 3, 1, 1)]),
        ("pixel_norm", lambda x: pixel_norm(x, 1), [(2, 4, 3, 3)]),
        ("pixel_norm_multi", lambda x: pixel_norm(x, (1, 2)), [(2, 4, 3, 3)]),
        ("lincomb", lambda a, b: lincomb(a, b, 0.7, -1.3), [(2, 3, 4), (2, 3, 4)]),
        ("scaled_cat", lambda a, b: scaled_cat(a, b, 0.5, 2.0), [(2, 3, 2, 2), (2, 1, 2, 2)]),
        ("clip", lambda x: clip(x * 3, 2.0), [(3, 7)]),
        ("upsample2x", upsample2x, [(2, 3, 3, 4)]),
        ("silu", silu, [(3, 5)]),
        ("modulate", modulate, [(2, 3, 4, 4), (2, 3, 1, 1), (2, 3, 1, 1)]),
        ("attention", attention, [(3, 7, 4), (3, 5, 4), (3, 5, 6)]),
    ],
)
def test_primitive_ops_gradcheck_backward_and_forward_ad(name, fn, shapes):
    inputs = [_rand(*s, seed=i).requires_grad_() for i, s in enumerate(shapes)]
    if name == "clip":
        inputs[0] = inputs[0].detach().clamp(-0.6, 0.6).add(torch.sign(inputs[0].detach()) * 0.1).requires_grad_()
    assert gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=True, check_undefined_grad=False)


def test_primitive_ops_accept_partial_tangents():
    x, w = _rand(2, 3, 5, 5), _rand(4, 3, 3, 3, seed=1)
    t = _rand(2, 3, 5, 5, seed=2)
    jvp = jvp_both(lambda a: conv2d(a, w, 1), (x,), (t,))
    torch.testing.assert_close(jvp, torch.nn.functional.conv2d(t, w, padding=1))
    a, b = _rand(2, 3), _rand(2, 3, seed=1)
    torch.testing.assert_close(jvp_both(lambda u: lincomb(u, b, 2.0, 3.0), (a,), (b,)), 2 * b)
    torch.testing.assert_close(jvp_both(lambda u: scaled_cat(a, u, 2.0, 3.0)[:, 3:], (b,), (a,)), 3 * a)


def test_attention_jvp_matches_autograd_of_naive_attention(monkeypatch):
    q, k, v = _rand(4, 9, 8), _rand(4, 11, 8, seed=1), _rand(4, 11, 5, seed=2)
    tq, tk, tv = _rand(4, 9, 8, seed=3), _rand(4, 11, 8, seed=4), _rand(4, 11, 5, seed=5)

    def naive(q, k, v):
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v

    ref_out, ref_t = torch.func.jvp(naive, (q, k, v), (tq, tk, tv))
    monkeypatch.setattr(attn_mod, "_BLOCK_ELEMENTS", 4 * 11 * 2)  # force 5 query blocks of 2 rows
    assert len(attn_mod._blocks(q, k)) == 5
    out, t = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, ref_out, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(t, ref_t, atol=1e-14, rtol=1e-12)
    # backward through blocks equals autograd through the naive version
    qs = [a.clone().requires_grad_() for a in (q, k, v)]
    g = _rand(4, 9, 5, seed=6)
    grads = torch.autograd.grad(attention(*qs), qs, g)
    grads_ref = torch.autograd.grad(naive(*qs), qs, g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


def test_attention_memory_is_bounded_by_blocks():
    q = torch.zeros(2, 4096, 8)
    blocks = attn_mod._blocks(q, q)
    assert len(blocks) > 1 and max(b.stop - b.start for b in blocks) * 2 * 4096 <= attn_mod._BLOCK_ELEMENTS


# -- layers ----------------------------------------------------------------------------------------------
def test_layers_jvp_equals_finite_difference():
    conv = MPConv(3, 4, (3, 3)).double()
    lin = MPConv(6, 5).double()
    _check_layer(lambda x: conv(x, gain=1.7), [_rand(2, 3, 6, 6)])
    _check_layer(lambda x: lin(x), [_rand(3, 6)])
    _check_layer(lambda x, s, b: adaptive_double_norm(x, s, b), [_rand(2, 4, 3, 3), _rand(2, 4), _rand(2, 4)])
    _check_layer(lambda a, b: mp_sum(a, b, 0.3), [_rand(2, 3), _rand(2, 3, seed=5)])
    _check_layer(lambda a, b: mp_cat(a, b, 0.5), [_rand(2, 3, 2, 2), _rand(2, 5, 2, 2, seed=5)])
    pos, four = PositionalEmbedding(16).double(), FourierEmbedding(16, scale=1.0).double()
    t = torch.tensor([0.1, 0.9, 1.5], dtype=D)
    _check_layer(lambda c: pos(c), [t])
    _check_layer(lambda c: four(c), [t])
    block = build_unet("tiny", 28, 1).double().enc["14x14_block0"]
    _check_layer(lambda x, e: block(x, e), [_rand(2, 32, 14, 14), _rand(2, 128)])


def test_mpconv_forward_is_pure_and_normalize_weight_keeps_the_function():
    conv = MPConv(3, 4, (3, 3)).double().train()
    x = _rand(2, 3, 5, 5)
    w0 = conv.weight.detach().clone()
    y = conv(x)
    assert torch.equal(conv.weight, w0)  # no in-place forced normalization during a forward
    conv.normalize_weight_()
    torch.testing.assert_close(conv.weight.square().mean(dim=(1, 2, 3)), torch.ones(4, dtype=D))
    torch.testing.assert_close(conv(x), y)  # the function it computes is unchanged


# -- the whole tiny network ------------------------------------------------------------------------------
def _tiny(res=28, ch=1, **kw):
    torch.manual_seed(0)
    net = build_unet("tiny", res, ch, **kw).double()
    with torch.no_grad():
        net.out_gain.fill_(1.0)  # 0 at init (F = 0); make the output depend on everything
    return net


@pytest.mark.parametrize("wrt", ["x", "t"])
def test_tiny_net_jvp_equals_finite_difference(wrt):
    net = _tiny(label_dim=10, guidance_embed=True).eval()
    x, t = _rand(3, 1, 28, 28), torch.tensor([0.05, 0.8, 1.52], dtype=D)
    labels, s = torch.tensor([3, 1, 7]), torch.tensor([1.0, 1.5, 2.0], dtype=D)
    if wrt == "x":
        fn, primals = (lambda u: net(u, t, labels, guidance=s)), [x]
    else:
        fn, primals = (lambda c: net(x, c, labels, guidance=s)), [t]
    tangents = [_rand(*p.shape, seed=9) for p in primals]
    jvp = jvp_both(fn, primals, tangents)
    fd = central_difference(fn, primals, tangents)
    scale = float(fd.abs().max())
    torch.testing.assert_close(jvp, fd, atol=1e-7 * max(1.0, scale), rtol=1e-6)


def test_non_square_net_jvp_equals_finite_difference():
    """24×32 images: blocks named by their feature maps (24x32 … 6x8), attention where the longer side is listed."""
    net = _tiny(res=(24, 32), ch=1).eval()
    assert "6x8_block0" in net.enc and net.enc["6x8_block0"].num_heads and not net.enc["24x32_block0"].num_heads
    x, t = _rand(2, 1, 24, 32), torch.tensor([0.2, 1.3], dtype=D)
    tangent = _rand(2, 1, 24, 32, seed=4)
    jvp = jvp_both(lambda u: net(u, t), [x], [tangent])
    fd = central_difference(lambda u: net(u, t), [x], [tangent])
    torch.testing.assert_close(jvp, fd, atol=1e-7 * max(1.0, float(fd.abs().max())), rtol=1e-6)


def test_tiny_net_backward_matches_a_directional_finite_difference():
    net = _tiny(res=32, ch=3)
    x, t = _rand(2, 3, 32, 32), torch.tensor([0.3, 1.2], dtype=D)
    params = [p for name, p in net.named_parameters() if not name.startswith("weight_")]  # w_φ unused here
    loss = net(x, t).square().mean()
    grads = torch.autograd.grad(loss, params)
    direction = [_rand(*p.shape, seed=i) for i, p in enumerate(params)]
    directional = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(h * d)
        plus = net(x, t).square().mean()
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * h * d)
        minus = net(x, t).square().mean()
    torch.testing.assert_close(directional, (plus - minus) / (2 * h), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("res,ch", [(28, 1), (32, 3), ((24, 32), 1)])
def test_tiny_forward_shapes_and_dtypes(res, ch):
    net = build_unet("tiny", res, ch)
    x = torch.randn(4, ch, *((res, res) if isinstance(res, int) else res))
    F, w = net(x, torch.rand(4) * 1.5, return_weight=True)
    assert F.shape == x.shape and F.dtype == torch.float32 and w.shape == (4,)
    assert torch.isfinite(F).all() and torch.isfinite(w).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net.embedding(torch.rand(4))
        out = net(x, torch.rand(4))
    assert emb.dtype == torch.float32  # time-embedding maths stays in fp32 under autocast
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert 1e6 <= net.num_parameters() <= 4e6


def test_time_conditioning_keeps_sin_t_dF_dt_bounded():
    """§4.1 / eq. 7: with c_noise(t) = t, sin t·‖∂F/∂t‖ stays bounded as t → π/2; with EDM's
    c_noise = log(σ_d tan t)/4 it grows like 1/cos t."""
    x = _rand(2, 1, 28, 28) * 0.5

    def sin_dFdt(net, t_value):
        t = torch.full((2,), t_value, dtype=D)
        _, dF = torch.func.jvp(lambda c: net(x, c), (t,), (torch.ones_like(t),))
        return math.sin(t_value) * float(dF.detach().norm())

    ts = [1.0, 1.5, math.pi / 2 - 1e-2, math.pi / 2 - 1e-4]
    ours = [sin_dFdt(_tiny(), s) for s in ts]
    log_sigma = [sin_dFdt(_tiny(c_noise="log_sigma", time_embed="fourier", fourier_scale=1.0), s) for s in ts]
    assert max(ours) / min(ours) < 3, ours
    assert log_sigma[-1] / log_sigma[0] > 100, log_sigma


def test_dropout_and_label_dropout_masks_are_shared_by_rng_replay():
    net = _tiny(label_dim=10, dropout=0.3, label_dropout=0.5).train()
    x, t, labels = _rand(8, 1, 28, 28), torch.rand(8, dtype=D) * 1.5, torch.arange(8)
    rewind = rng_replayer("cpu")
    a = net(x, t, labels)
    rewind()
    with fwAD.dual_level():  # a tangent pass draws the same masks as the training pass
        out = net(fwAD.make_dual(x, torch.ones_like(x)), t, labels)
        b = fwAD.unpack_dual(out).primal
    torch.testing.assert_close(a, b)
    c = net(x, t, labels)  # without replay: new masks
    assert not torch.allclose(a, c)
    net.eval()
    torch.testing.assert_close(net(x, t, labels), net(x, t, labels))


def test_guidance_input_and_defaults():
    net = _tiny(guidance_embed=True).eval()
    x, t = _rand(2, 1, 28, 28), torch.tensor([0.5, 1.0], dtype=D)
    torch.testing.assert_close(net(x, t), net(x, t, guidance=1.0))
    assert not torch.allclose(net(x, t, guidance=2.0), net(x, t))
    torch.testing.assert_close(net(x, t, guidance=torch.tensor([2.0, 2.0], dtype=D)), net(x, t, guidance=2.0))


# -- presets ---------------------------------------------------------------------------------------------
PAPER_PARAMS = {"S": 280.2e6, "M": 497.8e6, "L": 777.6e6, "XL": 1119.4e6, "XXL": 1523.4e6}


@pytest.mark.parametrize("preset", list(PAPER_PARAMS))
@pytest.mark.parametrize("channels", [4, 3])  # 64×64×4 latents (ImageNet 512²) and 64×64 pixels
def test_edm2_preset_parameter_counts_match_the_paper(preset, channels):
    with torch.device("meta"):
        net = build_unet(preset, 64, channels, label_dim=1000)
    n = net.num_parameters()
    assert abs(n / PAPER_PARAMS[preset] - 1) < 0.02, f"{preset}: {n / 1e6:.1f}M vs {PAPER_PARAMS[preset] / 1e6}M"


def test_preset_table_and_cifar_size():
    assert {"tiny", "cifar", "S", "M", "L", "XL", "XXL"} <= set(NET_PRESETS)
    with torch.device("meta"):
        n = build_unet("cifar", 32, 3).num_parameters()
    assert 50e6 < n < 70e6  # DDPM++ has 56M
    with pytest.raises(ValueError, match="unknown network preset"):
        build_unet("huge", 32, 3)


# -- bad input -------------------------------------------------------------------------------------------
def test_shape_errors_name_the_expected_shape():
    net = build_unet("tiny", 28, 1, label_dim=10)
    t = torch.rand(2)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        net(torch.randn(2, 3, 28, 28), t)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        net(torch.randn(2, 1, 32, 32), t)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        net(torch.randn(2, 28, 28), t)
    # label values are not read inside the network (no host-device synchronisation); they are checked where they
    # enter (data loaders, samplers): an index outside [0, label_dim) is a zero one-hot row, i.e. no class
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x, t, torch.tensor([3, 10]))[1], net(x, t)[1])
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 1, 28, 28), torch.rand(3))
    with pytest.raises(ValueError, match="unconditional"):
        build_unet("tiny", 28, 1)(torch.randn(2, 1, 28, 28), t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        build_unet("tiny", 30, 1)
    with pytest.raises(ValueError, match="time_embed"):
        build_unet("tiny", 28, 1, time_embed="learned")
