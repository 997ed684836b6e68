"""Activation checkpointing (`net.checkpointing=true`) in sCM's step: the tangent in its own no-grad pass (it stores
nothing) and the forward of F with every block recomputed in the backward pass give the gradients of the stored
step bit for bit, for scm's DiT (text and guidance inputs, dropout) and U-Net and for diffusers students (SD3's
transformer and SDXL's U-Net, through diffusers' own gradient checkpointing), and equal the fused pass's to rounding;
the fused pass refuses it by name; sampling is unchanged by it; a run sets the separate pass by itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scm.config import make_config
from scm.nets.registry import build_net
from scm.objectives import ConsistencyLoss

SD = 0.5


def _grads(net, x0, t, z, dtype, fused=False, **cond):
    torch.manual_seed(11)  # dropout masks: replayed by the checkpoint's recomputation
    loss, _ = ConsistencyLoss(sigma_d=SD, warmup_kimg=0, fused_pass=fused)(net, x0, t=t, z=z, **cond)
    return loss.detach(), [g.clone() for g in torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)]


def _same_step(make, shape, dtype, cond=None):
    """The sCM loss and every gradient, with and without checkpointing: bit for bit (float64 and float32 on this
    CPU: the recomputation runs the forward's own kernels on the same inputs, so the same sums in the same order)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, *shape, generator=g, dtype=dtype)
    z = torch.randn(2, *shape, generator=g, dtype=dtype)
    t = torch.tensor([0.3, 1.4], dtype=dtype)
    cond = cond or {}
    plain, ckpt = make(False), make(True)
    ckpt.load_state_dict(plain.state_dict())
    loss_a, grads_a = _grads(plain.to(dtype).train(), x0, t, z, dtype, **cond)
    loss_b, grads_b = _grads(ckpt.to(dtype).train(), x0, t, z, dtype, **cond)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    loss_f, grads_f = _grads(plain, x0, t, z, dtype, fused=True, **cond)  # the fused pass: the same to rounding
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_f, loss_a, **tol)
    for a, f in zip(grads_a, grads_f, strict=True):
        if a is not None:
            torch.testing.assert_close(f, a, **tol)
    with pytest.raises(RuntimeError, match="fused_pass=false"):
        _grads(ckpt, x0, t, z, dtype, fused=True, **cond)
    return plain, ckpt


def _scm_net(preset, overrides):
    cfg = make_config(preset, "sct", overrides)

    def make(checkpointing):
        torch.manual_seed(0)
        net = build_net(dataclasses.replace(cfg.net, checkpointing=checkpointing), SD)
        with torch.no_grad():  # zero-initialised gates and projections made non-trivial
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return net

    return make, cfg.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dit_with_text_guidance_and_dropout(dtype):
    make, shape = _scm_net("dit-tiny-28", ["net.depth=2", "net.dropout=0.2", "net.guidance_embed=true",
                                           "net.text_dim=8", "net.text_pooled_dim=8"])
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    cond = {"text": torch.randn(2, 6, 8, generator=g, dtype=dtype), "text_mask": mask,
            "text_pooled": torch.randn(2, 8, generator=g, dtype=dtype), "guidance": torch.tensor([1.0, 3.0])}
    plain, ckpt = _same_step(make, shape, dtype, cond)
    x = torch.randn(2, *shape, dtype=dtype)
    with torch.no_grad():  # sampling (no grad): checkpointing plays no part
        c2 = {k: v[:2] for k, v in cond.items()}
        assert torch.equal(plain.eval()(x, torch.tensor([1.0, 0.5], dtype=dtype), **c2),
                           ckpt.eval()(x, torch.tensor([1.0, 0.5], dtype=dtype), **c2))


def test_unet_with_dropout():
    make, shape = _scm_net("tiny-28", ["net.dropout=0.2"])
    _same_step(make, shape, torch.float64)


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_diffusers_students(family):
    pytest.importorskip("diffusers")
    from test_diffusers_t2i import CASES, _model, _prompts

    from scm.diffusers import student_from_diffusers

    model, scheduler = _model(family, torch.float64), CASES[family][1]()

    def make(checkpointing):
        net = student_from_diffusers(model, scheduler, sigma_d=SD, guidance_embed=True, checkpointing=checkpointing)
        assert net.model.is_gradient_checkpointing == checkpointing
        return net

    _same_step(make, CASES[family][2], torch.float64, _prompts(family, torch.float64, seed=3) | {"guidance": 2.0})


def test_a_run_with_checkpointing_takes_the_separate_tangent_pass():
    from scm.errors import ConfigError
    from scm.train.build import build_objective

    cfg = make_config("tiny-28", "sct", ["net.checkpointing=true"])
    assert build_objective(cfg).fused_pass is False
    with pytest.raises(ConfigError, match="checkpointing"):
        make_config("tiny-28", "sct", ["net.checkpointing=true", "loss.fused_pass=true"]).validate()
