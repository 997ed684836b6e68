"""The JVP-ready diffusion transformer: its custom-JVP ops (gradcheck and forward AD in float64), the whole
net against float64 finite differences under both forward-AD engines and in the fused pass, its conditioning
(labels, label dropout, guidance, time), the paper presets' sizes, and input and config errors."""

import dataclasses
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck

from scm._rng import rng_replayer
from scm.nets import build_net, net_config
from scm.nets.dit import DIT_PRESETS, DiT, DiTConfig
from scm.nets.functional import gated_residual, gelu, linear, modulated_layer_norm
from scm.nets.layers import adaptive_double_layer_norm
from scm.objectives import ConsistencyLoss
from scm.tangents import jvp_tangent

from conftest import central_difference, fill_zero_weights, jvp_both

D = torch.float64



def build_dit(preset: str, res, ch: int, **fields) -> DiT:
    """A DiT preset for res (R or (H, W)) × ch inputs, at σ_d = 0.5."""
    return build_net(net_config(preset, img_resolution=res, img_channels=ch, **fields), 0.5)

def _rand(*shape, seed=0):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=D)


# -- primitive ops: exact backward and forward AD (gradcheck compares both to finite differences) ----------
@pytest.mark.parametrize(
    "name,fn,shapes",
    [
        ("linear", linear, [(2, 3, 4), (5, 4), (5,)]),
        ("linear_no_bias", linear, [(3, 4), (5, 4)]),
        ("layer_norm", modulated_layer_norm, [(2, 3, 6)]),
        ("modulated_layer_norm", lambda x, s, b: modulated_layer_norm(x, s, b, gain=0.7),
         [(2, 3, 6), (2, 1, 6), (2, 1, 6)]),
        ("layer_norm_scale_only", lambda x, s: modulated_layer_norm(x, s, gain=0.5), [(2, 3, 6), (2, 1, 6)]),
        ("layer_norm_shift_only", lambda x, b: modulated_layer_norm(x, None, b, gain=0.5), [(2, 3, 6), (2, 1, 6)]),
        ("adaptive_double_layer_norm", adaptive_double_layer_norm, [(2, 3, 6), (2, 1, 6), (2, 1, 6)]),
        ("gated_residual", gated_residual, [(2, 3, 4), (2, 1, 4), (2, 3, 4)]),
        ("gelu", gelu, [(3, 5)]),
    ],
)
def test_dit_ops_gradcheck_backward_and_forward_ad(name, fn, shapes):
    inputs = [_rand(*s, seed=i).requires_grad_() for i, s in enumerate(shapes)]
    assert gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=True, check_undefined_grad=False)


@pytest.mark.parametrize(
    "fn,ref,shapes",
    [
        (linear, lambda x, w, b: x @ w.t() + b, [(2, 3, 4), (5, 4), (5,)]),
        (lambda x, s, b: modulated_layer_norm(x, s, b, gain=0.3),
         lambda x, s, b: torch.nn.functional.layer_norm(x, (6,), eps=1e-6) * s * 0.3 + b * 0.3,
         [(2, 3, 6), (2, 1, 6), (2, 1, 6)]),
        (gated_residual, lambda x, g, h: x + g * h, [(2, 3, 4), (2, 1, 4), (2, 3, 4)]),
    ],
)
def test_dit_ops_accept_partial_tangents(fn, ref, shapes):
    """Absent tangents arrive as None and are skipped; every subset of tangents gives the reference JVP."""
    primals = [_rand(*s, seed=i) for i, s in enumerate(shapes)]
    for mask in range(1, 1 << len(primals)):
        tangents = [_rand(*s, seed=10 + i) if mask >> i & 1 else None for i, s in enumerate(shapes)]
        full = [t if t is not None else torch.zeros_like(p) for p, t in zip(primals, tangents, strict=True)]
        expected = torch.func.jvp(ref, tuple(primals), tuple(full))[1]
        with fwAD.dual_level():
            duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            got = fwAD.unpack_dual(fn(*duals)).tangent
        assert got is not None and got.shape == expected.shape, mask
        torch.testing.assert_close(got, expected, msg=f"tangent mask {mask:b}")


# -- the whole network -----------------------------------------------------------------------------------
def _net(res=28, ch=1, depth=2, seed=0, **kw) -> DiT:
    """A small float64 DiT whose zero-initialized weights (gates, output layer, biases) are filled with small
    random values: at initialization F ≡ 0, and the tests would test nothing."""
    torch.manual_seed(seed)
    net = build_dit("dit-tiny", res, ch, depth=depth, **kw).double()
    fill_zero_weights(net, seed + 1)
    return net


def test_fresh_net_starts_at_zero_with_the_identity_blocks():
    net = build_dit("dit-tiny", 28, 1)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    assert torch.equal(net(x, t), torch.zeros_like(x))  # adaLN-Zero: zero output layer
    c = net.cfg.hidden_size
    for block in net.blocks:  # zero gates: every block starts as the identity
        assert not block.modulation.weight[2 * c:3 * c].any() and not block.modulation.weight[5 * c:].any()
        assert block.modulation.weight[:2 * c].abs().min() > 0  # double norm: scale/shift rows are random


@pytest.mark.parametrize("wrt", ["x", "t"])
def test_dit_jvp_equals_finite_difference(wrt):
    net = _net(label_dim=10, guidance_embed=True).eval()
    x, t = _rand(3, 1, 28, 28), torch.tensor([0.05, 0.8, 1.52], dtype=D)
    labels, s = torch.tensor([3, 1, 7]), torch.tensor([1.0, 1.5, 2.0], dtype=D)
    if wrt == "x":
        fn, primals = (lambda u: net(u, t, labels, guidance=s)), [x]
    else:
        fn, primals = (lambda c: net(x, c, labels, guidance=s)), [t]
    tangents = [_rand(*p.shape, seed=9) for p in primals]
    jvp = jvp_both(fn, primals, tangents)
    fd = central_difference(fn, primals, tangents)
    assert float(jvp.abs().max()) > 1e-3  # the perturbed net depends on the input
    torch.testing.assert_close(jvp, fd, atol=1e-7 * max(1.0, float(fd.abs().max())), rtol=1e-6)


def test_non_square_images_tokens_positions_and_jvp():
    """24×32 images with 4×4 patches: 6 rows × 8 columns of tokens, patchify inverted by unpatchify, each token's
    position embedding that of its (row, column), and the JVP still exact."""
    net = _net(res=(24, 32)).eval()
    assert net.grid == (6, 8) and net.pos_embed.shape == (48, net.cfg.hidden_size)
    x = _rand(2, 1, 24, 32)
    tokens = net.patchify(x)
    assert tokens.shape == (2, 48, 16) and torch.equal(net.unpatchify(tokens), x)
    assert torch.equal(tokens[:, 8 + 2], x[:, 0, 4:8, 8:12].reshape(2, 16))  # row 1, column 2
    quarter = net.cfg.hidden_size // 4
    omega = 10_000.0 ** (-torch.arange(quarter, dtype=D) / quarter)
    torch.testing.assert_close(net.pos_embed[8 + 2].double(), torch.cat(
        [torch.sin(1 * omega), torch.cos(1 * omega), torch.sin(2 * omega), torch.cos(2 * omega)]).float().double())
    t, tangent = torch.tensor([0.3, 1.2], dtype=D), _rand(2, 1, 24, 32, seed=5)
    jvp = jvp_both(lambda u: net(u, t), [x], [tangent])
    fd = central_difference(lambda u: net(u, t), [x], [tangent])
    torch.testing.assert_close(jvp, fd, atol=1e-7 * max(1.0, float(fd.abs().max())), rtol=1e-6)  # as above


def test_dit_jvp_tangent_methods_agree():
    """jvp_tangent through the DiT: forward_ad and torch.func agree, and match a finite difference."""
    net = _net(res=32, ch=3).eval()
    x_t, dxdt = _rand(2, 3, 32, 32) * 0.5, _rand(2, 3, 32, 32, seed=1)
    t = torch.tensor([0.4, 1.3], dtype=D)
    F_ad, J_ad = jvp_tangent(net, x_t, t, dxdt, 0.5)
    F_fn, J_fn = jvp_tangent(net, x_t, t, dxdt, 0.5, method="func")
    _, J_fd = jvp_tangent(net, x_t, t, dxdt, 0.5, method="finite_difference")
    torch.testing.assert_close(F_fn, F_ad, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(J_fn, J_ad, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(J_fd, J_ad, atol=1e-8, rtol=1e-6)


def test_fused_pass_keeps_the_graph_of_F_only():
    """One pass records F for backward and computes the tangent from detached values: the tangent needs no
    graph, the gradients equal a plain forward's, and JF equals a separate tangent pass."""
    net = _net(label_dim=10)
    x_t, dxdt = _rand(3, 1, 28, 28) * 0.5, _rand(3, 1, 28, 28, seed=1)
    t, labels = torch.tensor([0.2, 0.7, 1.4], dtype=D), torch.tensor([0, 4, 9])
    with fwAD.dual_level():  # no autograd graph is recorded for the tangent itself
        out = net(fwAD.make_dual(x_t / 0.5, dxdt), fwAD.make_dual(t, torch.ones_like(t)), labels)
        primal, tangent = fwAD.unpack_dual(out)
        assert primal.requires_grad and not tangent.requires_grad
    F, JF, (w,) = jvp_tangent(lambda u, s, **c: net(u, s, return_weight=True, **c), x_t, t, dxdt, 0.5,
                              primal_grad=True, labels=labels)
    assert F.requires_grad and w.requires_grad and JF.grad_fn is None and not JF.requires_grad
    params = [p for name, p in net.named_parameters() if not name.startswith("weight_")]
    loss = F.square().sum() + w.sum()
    grads = torch.autograd.grad(loss, params)
    F_ref, w_ref = net(x_t / 0.5, t, labels, return_weight=True)
    grads_ref = torch.autograd.grad(F_ref.square().sum() + w_ref.sum(), params)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(JF, jvp_tangent(net, x_t, t, dxdt, 0.5, labels=labels)[1])


def test_dit_backward_matches_a_directional_finite_difference():
    net = _net(res=32, ch=3, label_dim=4, guidance_embed=True)
    x, t = _rand(2, 3, 32, 32), torch.tensor([0.3, 1.2], dtype=D)
    labels = torch.tensor([1, 3])
    params = [p for name, p in net.named_parameters() if not name.startswith("weight_")]  # w_φ unused here
    loss_fn = lambda: net(x, t, labels, guidance=1.5).square().mean()  # noqa: E731
    grads = torch.autograd.grad(loss_fn(), params)
    direction = [_rand(*p.shape, seed=i) for i, p in enumerate(params)]
    directional = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(h * d)
        plus = loss_fn()
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * h * d)
        minus = loss_fn()
    torch.testing.assert_close(directional, (plus - minus) / (2 * h), atol=1e-8, rtol=1e-6)


def test_consistency_loss_trains_the_dit():
    """sCT's loss (fused pass, adaptive weighting) runs through the DiT and gives finite gradients everywhere."""
    net = build_dit("dit-tiny", 28, 1, label_dim=10, dropout=0.1, label_dropout=0.1).train()
    x0, labels = torch.randn(4, 1, 28, 28) * 0.5, torch.tensor([0, 3, 5, 9])
    loss, stats = ConsistencyLoss()(net, x0, 100.0, generator=torch.Generator().manual_seed(0), labels=labels)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.normalize_weights_()  # forced weight normalization of the w_φ head (MPConv)
    torch.testing.assert_close(net.weight_linear.weight.square().mean(), torch.tensor(1.0))


@pytest.mark.parametrize("res,ch", [(28, 1), (32, 3), ((24, 32), 1)])
def test_dit_tiny_shapes_dtypes_and_size(res, ch):
    net = build_dit("dit-tiny", res, ch)
    with torch.no_grad():
        net.final_linear.weight.normal_(0, 0.02)  # F ≢ 0
    x = torch.randn(4, ch, *((res, res) if isinstance(res, int) else res))
    F, w = net(x, torch.rand(4) * 1.5, return_weight=True)
    assert F.shape == x.shape and F.dtype == torch.float32 and w.shape == (4,) and w.dtype == torch.float32
    assert torch.isfinite(F).all() and torch.isfinite(w).all() and F.abs().max() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net.embedding(torch.rand(4))
        out, w16 = net(x, torch.rand(4), return_weight=True)
        _, JF = jvp_tangent(net, x * 0.5, torch.rand(4), torch.randn_like(x), 0.5)
    assert emb.dtype == torch.float32 and w16.dtype == torch.float32  # embedding maths stays in fp32 under autocast
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(JF).all()
    assert 1e6 <= net.num_parameters() <= 3e6


def test_time_conditioning_keeps_sin_t_dF_dt_bounded():
    """§4.1 / eq. 7: with c_noise(t) = t, sin t·‖∂F/∂t‖ stays bounded as t → π/2; with EDM's
    c_noise = log(σ_d tan t)/4 it grows like 1/cos t."""
    x = _rand(2, 1, 28, 28) * 0.5

    def sin_dFdt(net, t_value):
        t = torch.full((2,), t_value, dtype=D)
        _, dF = torch.func.jvp(lambda c: net(x, c), (t,), (torch.ones_like(t),))
        return math.sin(t_value) * float(dF.detach().norm())

    ts = [1.0, 1.5, math.pi / 2 - 1e-2, math.pi / 2 - 1e-4]
    ours = [sin_dFdt(_net(depth=1), s) for s in ts]
    log_sigma = [sin_dFdt(_net(depth=1, c_noise="log_sigma"), s) for s in ts]
    assert max(ours) / min(ours) < 3, ours
    assert log_sigma[-1] / log_sigma[0] > 100, log_sigma


def test_double_norm_makes_the_modulation_invariant_to_weight_scales():
    """Stabiliser (b): F and ∂F/∂t do not change when the embedding MLP's or a block's scale/shift weights
    grow (DiT's adaLN-Zero, the ablation, changes with them)."""
    x, t = _rand(2, 1, 28, 28), torch.tensor([0.3, 1.5], dtype=D)

    def f_and_dfdt(net):
        return torch.func.jvp(lambda c: net(x, c), (t,), (torch.ones_like(t),))

    for modulation, invariant in (("double_norm", True), ("adaln_zero", False)):
        net = _net(depth=1, modulation=modulation).eval()
        before = f_and_dfdt(net)
        c = net.cfg.hidden_size
        with torch.no_grad():
            net.time_mlp2.weight.mul_(10)
            net.time_mlp2.bias.mul_(10)
            net.blocks[0].modulation.weight[:2 * c].mul_(10)  # shift and scale of the attention branch
            net.blocks[0].modulation.bias[:2 * c].mul_(10)
        after = f_and_dfdt(net)
        for a, b in zip(before, after, strict=True):
            change = float((a - b).detach().abs().max() / b.detach().abs().max())
            assert change < 1e-6 if invariant else change > 1e-2, (modulation, change)  # 1e-6: the norms' eps


def test_qk_norm_bounds_the_attention_logits():
    """Stabiliser (c): with QK normalization the attention ignores the scale of q and k."""
    x, t = _rand(2, 1, 28, 28), torch.tensor([0.3, 1.5], dtype=D)
    for qk_norm in (True, False):
        net = _net(depth=1, qk_norm=qk_norm).eval()
        before = net(x, t)
        c = net.cfg.hidden_size
        with torch.no_grad():
            net.blocks[0].qkv.weight[:2 * c].mul_(5)  # q and k rows
            net.blocks[0].qkv.bias[:2 * c].mul_(5)
        with torch.no_grad():
            change = float((net(x, t) - before).abs().max() / before.abs().max())
        assert change < 1e-6 if qk_norm else change > 1e-2, (qk_norm, change)


def test_labels_and_dropout_masks_are_shared_by_rng_replay():
    net = _net(label_dim=10, dropout=0.3, label_dropout=0.5).train()
    x, t, labels = _rand(8, 1, 28, 28), torch.rand(8, dtype=D) * 1.5, torch.arange(8)
    rewind = rng_replayer("cpu")
    a = net(x, t, labels)
    rewind()
    with fwAD.dual_level():  # a tangent pass draws the same masks as the training pass
        out = net(fwAD.make_dual(x, torch.ones_like(x)), t, labels)
        b = fwAD.unpack_dual(out).primal
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, net(x, t, labels))  # without replay: new masks
    net.eval()
    torch.testing.assert_close(net(x, t, labels), net(x, t, labels))
    # label dropout alone zeroes whole rows of the one-hot labels: each example is either its class or none
    net = _net(label_dim=10, label_dropout=0.5).train()
    torch.manual_seed(1)
    dropped = net(x, t, labels)
    with torch.no_grad():
        net.eval()
        cond, uncond = net(x, t, labels), net(x, t)
    kept = [torch.allclose(dropped[i], cond[i]) for i in range(8)]
    assert 0 < sum(kept) < 8
    for i in range(8):
        torch.testing.assert_close(dropped[i], cond[i] if kept[i] else uncond[i])


def test_labels_indices_soft_and_unconditional():
    net = _net(label_dim=5).eval()
    x, t = _rand(3, 1, 28, 28), torch.tensor([0.2, 0.9, 1.3], dtype=D)
    idx = torch.tensor([0, 4, 2])
    onehot = torch.nn.functional.one_hot(idx, 5).double()
    torch.testing.assert_close(net(x, t, idx), net(x, t, onehot))
    torch.testing.assert_close(net(x, t), net(x, t, torch.zeros(3, 5, dtype=D)))  # zeros = unconditional
    torch.testing.assert_close(net(x, t, torch.tensor([0, 4, 5]))[2], net(x, t)[2])  # out of range: no class
    assert not torch.allclose(net(x, t, idx), net(x, t))


def test_guidance_input_and_defaults():
    net = _net(guidance_embed=True).eval()
    x, t = _rand(2, 1, 28, 28), torch.tensor([0.5, 1.0], dtype=D)
    torch.testing.assert_close(net(x, t), net(x, t, guidance=1.0))
    assert not torch.allclose(net(x, t, guidance=2.0), net(x, t))
    torch.testing.assert_close(net(x, t, guidance=torch.tensor([2.0, 2.0], dtype=D)), net(x, t, guidance=2.0))
    with pytest.raises(ValueError, match=r"guidance.*\[2\]"):
        net(x, t, guidance=torch.ones(3))


# -- presets and configuration ---------------------------------------------------------------------------
PAPER_PARAMS = {"DiT-S/2": 33.0e6, "DiT-B/2": 130.5e6, "DiT-L/2": 458.1e6, "DiT-XL/2": 675.1e6}  # DiT, Table 1


@pytest.mark.parametrize("preset", list(PAPER_PARAMS))
def test_dit_preset_parameter_counts_match_the_paper(preset):
    with torch.device("meta"):
        net = build_dit(preset, 32, 4, label_dim=1000)
    n = net.num_parameters()
    assert abs(n / PAPER_PARAMS[preset] - 1) < 0.02, f"{preset}: {n / 1e6:.1f}M vs {PAPER_PARAMS[preset] / 1e6}M"


def test_preset_table_and_config_round_trip():
    assert {"dit-tiny", *PAPER_PARAMS} | {f"{name}-text" for name in ("dit-tiny", *PAPER_PARAMS)} == set(DIT_PRESETS)
    with pytest.raises(ValueError, match=r"unknown network preset.*dit-tiny"):
        build_dit("DiT-XXL/2", 32, 4)
    net = build_dit("dit-tiny", 32, 3, label_dim=10, guidance_embed=True)
    cfg = DiTConfig(**dataclasses.asdict(net.cfg))
    assert cfg == net.cfg and DiT(cfg, 0.5).num_parameters() == net.num_parameters()
    assert all(p.ndim >= 1 for p in net.parameters())  # no scalar parameters (FSDP2 cannot shard them)


@pytest.mark.parametrize(
    "field,value",
    [
        ("img_resolution", 30),  # not divisible by the patch size
        ("patch_size", 0),
        ("hidden_size", 130),  # not a multiple of 4
        ("num_heads", 3),  # hidden_size not a multiple
        ("num_heads", 0),
        ("depth", 0),
        ("mlp_ratio", 0),
        ("dropout", 1.0),
        ("label_dropout", -0.1),
        ("label_dim", -1),
        ("embed_channels", 7),
        ("modulation", "adagn"),
        ("c_noise", "sigma"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DiTConfig(**{**DIT_PRESETS["dit-tiny"], "img_resolution": 28, "img_channels": 1, field: value})


def test_shape_errors_name_the_expected_shape():
    net = build_dit("dit-tiny", 28, 1, label_dim=10)
    t = torch.rand(2)
    for bad in (torch.randn(2, 3, 28, 28), torch.randn(2, 1, 32, 32), torch.randn(2, 28, 28)):
        with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
            net(bad, t)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        net(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"labels must .*\[2\]"):
        net(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        build_dit("dit-tiny", 28, 1)(x, t, torch.tensor([1, 2]))


@pytest.mark.parametrize("value, expected", [("math", "math"), ("auto", "auto"), ("", "auto"), ("flash", None)])
def test_scm_attention_environment_variable(value, expected):
    """SCM_ATTENTION=math sets the layer backend for a process; anything but auto/math is refused by name."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SCM_ATTENTION": value}
    proc = subprocess.run([sys.executable, "-c", "import scm.nets.attention as a; print(a.LAYER_BACKEND)"],
                          env=env, capture_output=True, text=True)
    if expected is None:
        assert proc.returncode != 0 and f"SCM_ATTENTION={value!r}" in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == expected


@pytest.mark.parametrize("preset", ["dit-tiny", *PAPER_PARAMS])
def test_text_presets_add_cross_attention_and_the_caption_mlp_only(preset):
    """A text preset = its base + per block q, kv and output projections (4c² + 4c) + the caption MLP
    (text_dim·c + c + c² + c) + the pooled MLP (same form, when the encoder has a pooled vector)."""
    with torch.device("meta"):
        base, text = build_dit(preset, 32, 4), build_dit(f"{preset}-text", 32, 4)
    c, depth, cfg = base.cfg.hidden_size, base.cfg.depth, text.cfg
    mlp = lambda width: width * c + c + c * c + c * (1 if width else 0) if width else 0  # noqa: E731
    expected = base.num_parameters() + depth * (4 * c * c + 4 * c) + mlp(cfg.text_dim) + mlp(cfg.text_pooled_dim)
    assert text.num_parameters() == expected
