"""The text-conditioned networks, DiT and U-Net (cross-attention to a padded prompt, pooled embedding), and the
prompt side of `scm.conditioning.Conditioning`: exact JVP through masked cross-attention, padding ignored, CFG with
the empty prompt, caption dropout, prompts per image."""

from __future__ import annotations

import pytest
import torch

from scm.conditioning import Conditioning, guided
from scm.errors import SamplerError
from scm.nets import build_net, net_config
from scm.nets.dit import DIT_PRESETS
from scm.nets.unet import UNET_PRESETS
from scm.text import BuiltinEncoder, TextConfig, encode_prompts

from conftest import central_difference, fill_zero_weights, jvp_both

D = torch.float64
T, W = 6, 16  # prompt tokens and width of these tests' prompts


def _rand(*shape, seed=0):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=D)


# Small configs of both text networks: the DiT at depth 2; the U-Net at width 16 (its 7×7 level has self- and
# cross-attention in 2 encoder and 4 decoder blocks).
SMALL = {"dit-tiny-text": {"depth": 2}, "tiny-text": {"model_channels": 16, "channels_per_head": 8}}
ARCH = pytest.mark.parametrize("arch", list(SMALL))


def _text_net(arch="dit-tiny-text", pooled=W, seed=0, **kw):
    """A float64 text network whose zero-initialized weights are filled with small random values (else F ≡ 0 and the
    DiT's cross-attention is silent: the tests would test nothing)."""
    torch.manual_seed(seed)
    cfg = net_config(arch, img_resolution=28, img_channels=1, text_dim=W, text_pooled_dim=pooled,
                     **{**SMALL[arch], **kw})
    net = build_net(cfg, 0.5).double()
    fill_zero_weights(net, seed + 1)
    return net.eval()


def _prompt(batch=3, seed=5):
    """Tokens [B, T, W], a mask with padding (row 0 full, row 1 half, the last row empty), pooled [B, W]."""
    tokens, pooled = _rand(batch, T, W, seed=seed), _rand(batch, W, seed=seed + 1)
    lengths = [T, T // 2] + [0] * (batch - 2)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return tokens, mask, pooled


def test_fresh_text_net_starts_silent_to_the_prompt():
    cfg = net_config("dit-tiny-text", img_resolution=28, img_channels=1, text_dim=W, text_pooled_dim=W)
    net = build_net(cfg, 0.5)
    assert all(not b.cross_proj.weight.any() for b in net.blocks)  # zero-initialized cross-attention output
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    tokens, mask, pooled = _prompt(2)
    tokens, pooled = tokens.float(), pooled.float()
    assert torch.equal(net(x, t, text=tokens, text_mask=mask, text_pooled=pooled), torch.zeros_like(x))


@ARCH
@pytest.mark.parametrize("wrt", ["x", "t"])
def test_text_net_jvp_equals_finite_difference_through_masked_cross_attention(arch, wrt):
    net = _text_net(arch)
    x, t = _rand(3, 1, 28, 28), torch.tensor([0.05, 0.8, 1.52], dtype=D)
    tokens, mask, pooled = _prompt(3)
    cond = dict(text=tokens, text_mask=mask, text_pooled=pooled)
    fn, primals = ((lambda u: net(u, t, **cond)), [x]) if wrt == "x" else ((lambda c: net(x, c, **cond)), [t])
    tangents = [_rand(*p.shape, seed=9) for p in primals]
    jvp = jvp_both(fn, primals, tangents)
    fd = central_difference(fn, primals, tangents)
    assert torch.isfinite(jvp).all() and float(jvp.detach().abs().max()) > 1e-3
    # float64 central difference: error ~1e-10 (conftest.central_difference); 1e-7 relative leaves a margin
    torch.testing.assert_close(jvp, fd, atol=1e-7 * max(1.0, float(fd.abs().max())), rtol=1e-6)


@ARCH
def test_padding_is_ignored_and_the_prompt_matters(arch):
    net = _text_net(arch)
    x, t = _rand(3, 1, 28, 28), torch.full((3,), 0.9, dtype=D)
    tokens, mask, pooled = _prompt(3)
    base = net(x, t, text=tokens, text_mask=mask, text_pooled=pooled)
    junk = torch.where(mask[..., None], tokens, _rand(3, T, W, seed=77))  # other values at padded positions only
    assert torch.equal(net(x, t, text=junk, text_mask=mask, text_pooled=pooled), base)
    other = tokens.clone()
    other[0, 0] += 1.0  # a real token of example 0
    changed = net(x, t, text=other, text_mask=mask, text_pooled=pooled)
    assert not torch.allclose(changed[0], base[0]) and torch.equal(changed[1:], base[1:])
    assert torch.isfinite(base[2]).all()  # the empty prompt (every key masked)


@ARCH
def test_an_example_does_not_depend_on_its_batch(arch):
    net = _text_net(arch)
    x, t = _rand(3, 1, 28, 28), torch.tensor([0.3, 0.9, 1.4], dtype=D)
    tokens, mask, pooled = _prompt(3)
    full = net(x, t, text=tokens, text_mask=mask, text_pooled=pooled)
    one = net(x[1:2], t[1:2], text=tokens[1:2], text_mask=mask[1:2], text_pooled=pooled[1:2])
    torch.testing.assert_close(one, full[1:2], atol=1e-12, rtol=0)  # float64: only summation order differs


@ARCH
def test_prompt_inputs_are_checked_by_shape(arch):
    net = _text_net(arch)
    x, t = _rand(2, 1, 28, 28), torch.rand(2, dtype=D)
    tokens, mask, pooled = _prompt(2)
    with pytest.raises(ValueError, match="text is missing"):
        net(x, t)
    with pytest.raises(ValueError, match="text must have shape"):
        net(x, t, text=tokens[..., :3], text_mask=mask, text_pooled=pooled)
    with pytest.raises(ValueError, match="text_mask must be bool"):
        net(x, t, text=tokens, text_mask=mask.double(), text_pooled=pooled)
    plain_preset = arch.removesuffix("-text")
    plain = build_net(net_config(plain_preset, img_resolution=28, img_channels=1), 0.5).double()
    with pytest.raises(ValueError, match="takes no prompt"):
        plain(x, t, text=tokens, text_mask=mask)
    with pytest.raises(ValueError, match="text_pooled_dim needs text_dim"):
        net_config(plain_preset, img_resolution=28, img_channels=1, text_pooled_dim=4)


def test_text_presets_exist_for_every_size():
    for name in ("dit-tiny-text", "DiT-S/2-text", "DiT-B/2-text", "DiT-L/2-text", "DiT-XL/2-text"):
        assert DIT_PRESETS[name]["text_dim"] > 0
    for name in ("tiny-text", "S-text", "M-text", "L-text", "XL-text", "XXL-text"):
        assert UNET_PRESETS[name]["text_dim"] > 0


def test_unet_pooled_embedding_and_tokens_do_not_depend_on_the_encoders_scale():
    """The U-Net normalizes the prompt's tokens and pooled vector to unit RMS (magnitude-preserving inputs)."""
    net = _text_net("tiny-text")
    x, t = _rand(3, 1, 28, 28), torch.full((3,), 0.7, dtype=D)
    tokens, mask, pooled = _prompt(3)
    base = net(x, t, text=tokens, text_mask=mask, text_pooled=pooled)
    # normalize's eps (1e-8 on the mean square) moves a unit-RMS input by ~5e-9 relative and a 3×-scaled one by less:
    # the outputs differ by about that, far below 1e-6, which a missing normalization (×3 inputs) would exceed
    torch.testing.assert_close(net(x, t, text=3 * tokens, text_mask=mask, text_pooled=3 * pooled), base,
                               atol=1e-6, rtol=0)
    assert not torch.allclose(net(x, t, text=tokens, text_mask=mask, text_pooled=-pooled), base)


# -- conditioning -----------------------------------------------------------------------------------------------
def _text_conditioning(dropout=0.5, guidance="cfg"):
    enc = BuiltinEncoder(width=W, max_tokens=T)
    text = TextConfig(enc.spec, T, W, W, "float16", dropout)
    return Conditioning(0, guidance, 1.0 if guidance != "none" else None, text)


def test_null_is_the_empty_prompt_and_guidance_broadcasts_it():
    cond = _text_conditioning()
    null = cond.null()
    assert null["text_mask"].shape == (1, T) and not null["text_mask"].any() and not null["text_pooled"].any()
    calls = []

    def fn(x, t, **c):
        calls.append(c)
        return x * c["text_pooled"].sum(1)[:, None, None, None] + 1.0

    x, t = torch.randn(4, 1, 2, 2), torch.rand(4)
    inputs = cond.sample_inputs(torch.arange(4), prompts="a thick seven")
    inputs.pop("guidance")
    out = cond.guided(fn)(x, t, guidance=3.0, **inputs)
    # one call: the conditional rows, then the empty prompt's
    assert len(calls) == 1 and calls[0]["text"].shape == (8, T, W)
    assert torch.equal(calls[0]["text_mask"][:4], inputs["text_mask"]) and not calls[0]["text_mask"][4:].any()
    F_c = fn(x, t, **inputs)
    F_u = fn(x, t, **{k: v.expand(4, *v.shape[1:]) for k, v in null.items()})
    torch.testing.assert_close(out, F_u + 3.0 * (F_c - F_u))


@ARCH
def test_guidance_in_one_call_equals_two_calls(arch):
    """The conditional and empty-prompt evaluations stacked into one call give the two calls' F_s (float64: the
    networks are per-example, so only the order of sums may differ, ~1e-15), for one scale per example too."""
    net = _text_net(arch)
    null = {"text": torch.zeros(1, T, W, dtype=D), "text_mask": torch.zeros(1, T, dtype=torch.bool),
            "text_pooled": _rand(1, W, seed=9)}
    tokens, mask, pooled = _prompt(3)
    x, t = _rand(3, 1, 28, 28, seed=2), torch.tensor([0.3, 0.9, 1.4], dtype=D)
    calls = []

    def counted(*a, **c):
        calls.append(a[0].shape[0])
        return net(*a, **c)

    for s in (2.5, torch.tensor([1.0, 2.0, 3.5], dtype=D)):
        calls.clear()
        one = guided(counted, null)(x, t, guidance=s, text=tokens, text_mask=mask, text_pooled=pooled)
        two = guided(counted, null, one_call=False)(x, t, guidance=s, text=tokens, text_mask=mask, text_pooled=pooled)
        assert calls == [6, 3, 3]
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)
        assert (one - net(x, t, text=tokens, text_mask=mask, text_pooled=pooled)).abs().max() > 1e-3  # guided


def test_sample_inputs_encode_each_images_prompt_as_training_stored_it():
    cond = _text_conditioning()
    got = cond.sample_inputs(torch.arange(3), prompts=["a thick seven", "a thin one", ""])
    ref = BuiltinEncoder(width=W, max_tokens=T).encode(["a thick seven", "a thin one", ""])
    assert torch.equal(got["text"], ref.tokens.half().float())  # rounded as the float16 training embeddings
    assert torch.equal(got["text_mask"], ref.mask)
    assert got["guidance"] == 1.0
    assert torch.equal(encode_prompts(cond.text, ["a thin one"])["text"], got["text"][1:2])


@pytest.mark.parametrize("prompts,match", [(None, "text-conditioned"), ([], "at least one"), ([3], "must be text"),
                                           (["a", "b"], "2 prompts for 3 images")])
def test_bad_prompt_requests_are_refused_by_name(prompts, match):
    with pytest.raises(SamplerError, match=match) as e:
        _text_conditioning().sample_inputs(torch.arange(3), prompts=prompts)
    assert e.value.key == "prompt"


def test_a_model_without_text_refuses_a_prompt():
    with pytest.raises(SamplerError, match="takes no prompt"):
        Conditioning(10, "cfg", 1.0).sample_inputs(torch.arange(2), prompts="a seven")


def test_caption_dropout_replaces_whole_prompts_by_the_empty_one_reproducibly():
    cond = _text_conditioning(dropout=0.5)
    batch = cond.sample_inputs(torch.arange(64), prompts="a thick seven")
    data = {k: batch[k] for k in ("text", "text_mask", "text_pooled")}
    a = cond.from_batch(data, torch.Generator().manual_seed(1))
    b = cond.from_batch(data, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    dropped = ~a["text_mask"].any(1)
    assert 16 < int(dropped.sum()) < 48  # about half, of 64
    assert not a["text_pooled"][dropped].any() and torch.equal(a["text"][~dropped], data["text"][~dropped])
    assert all(torch.equal(cond.from_batch(data)[k], data[k]) for k in data)  # no generator: no dropout
