"""The video transformer (`scm.nets.video`): exact JVP in both attention layouts (float64 central differences),
shapes, tokens and positions, a fresh network, presets, config errors, and a few-step diffusion/sCT/sCD run with
sampling on in-memory clips [N, 1, 8, 32, 32]. Runs in ~3 s on two idle CPU threads (both files: 4.6 s)."""

import math

import pytest
import torch

from scm.config import make_config
from scm.data.images import ImageData
from scm.errors import ConfigError
from scm.generate import Sampler, generate
from scm.nets import VIDEO_PRESETS, VideoConfig, VideoTransformer, build_net, net_config
from scm.nets.dit import sincos_position_embedding
from scm.nets.video import count_parameters
from scm.runs import load_run
from scm.train import train

from conftest import assert_exact_jvp, fill_zero_weights

D = torch.float64


def _net(attention: str, seed: int = 0, **fields) -> VideoTransformer:
    """A small float64 video net (4×8×8 clips, 2×4×4 patches: 2 token frames of 4 tokens) whose zero-initialized
    weights (gates, output layer, biases) are filled with random values: a fresh net's F ≡ 0 would test nothing."""
    torch.manual_seed(seed)
    fields = {"frames": 4, "img_resolution": 8, "img_channels": 1, "temporal_patch": 2, "depth": 2,
              "attention": attention, "label_dim": 3, "guidance_embed": True, **fields}
    cfg = net_config("video-tiny", **fields)
    net = build_net(cfg, 0.5).double().eval()
    fill_zero_weights(net, seed + 1)
    return net


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("attention", ["factorised", "full"])
def test_jvp_in_x_and_t_equals_central_differences(attention):
    net = _net(attention)
    x, t = _rand(3, 1, 4, 8, 8), torch.tensor([0.05, 0.8, 1.52], dtype=D)
    labels, s = torch.tensor([2, 0, 1]), torch.tensor([1.0, 1.5, 2.0], dtype=D)
    fn = lambda u, c: net(u, c, labels, guidance=s)  # noqa: E731
    primals, tangents = [x, t], [_rand(3, 1, 4, 8, 8, seed=9), torch.tensor([1.0, -0.5, 0.3], dtype=D)]
    assert_exact_jvp(fn, primals, tangents)


def _leak_to_second_frame(net: VideoTransformer) -> float:
    """The largest tangent in the second token frame of a perturbation of the first frame's first patch."""
    x, t = _rand(1, 1, 4, 8, 8), torch.tensor([0.7], dtype=D)
    dx = torch.zeros_like(x)
    dx[:, :, :2, :4, :4] = 1.0  # first token frame (frames 0-1), first patch
    _, jvp = torch.func.jvp(lambda u: net(u, t), (x,), (dx,))
    return float(jvp[:, :, 2:].abs().max())


@pytest.mark.parametrize("attention", ["factorised", "full"])
def test_layouts_attend_where_they_should(attention):
    """One block: full attention carries a change in one frame to the others; factorised attention does so only
    through its temporal branch (with that branch's gate at zero the frames stay apart exactly)."""
    net = _net(attention, depth=1)
    assert _leak_to_second_frame(net) > 1e-6
    if attention == "factorised":
        c = net.cfg.hidden_size
        with torch.no_grad():
            net.blocks[0].time_modulation.weight[2 * c:].zero_()
            net.blocks[0].time_modulation.bias[2 * c:].zero_()
        assert _leak_to_second_frame(net) == 0.0


@pytest.mark.parametrize("attention", ["factorised", "full"])
def test_fresh_net_shapes_tokens_and_weight(attention):
    net = build_net(net_config("video-tiny", frames=8, img_resolution=32, img_channels=1, attention=attention,
                               label_dim=10, guidance_embed=True), 0.5)
    x, t = torch.randn(2, 1, 8, 32, 32), torch.rand(2) * 1.5
    F, w = net(x, t, torch.tensor([1, 2]), guidance=2.0, return_weight=True)
    assert F.shape == x.shape and w.shape == (2,) and torch.isfinite(F).all() and torch.isfinite(w).all()
    assert torch.equal(F, torch.zeros_like(F))  # zero gates and output layer: a fresh net gives F = 0
    assert net.grid == (8, 8, 8) and net.pos_embed.shape == (512, 128)
    tokens = net.patchify(x)
    assert tokens.shape == (2, 512, 16) and torch.equal(net.unpatchify(tokens), x)
    assert torch.equal(tokens[:, 0], x[:, 0, 0, :4, :4].reshape(2, 16))  # token 0: frame 0, the top-left patch
    assert torch.equal(tokens[:, 64], x[:, 0, 1, :4, :4].reshape(2, 16))  # time is the outermost token axis


def test_position_embedding_is_separable_sin_cos():
    """(t, h, w) take 44, 42, 42 of 128 channels; each axis's block depends on its coordinate only; the 2-D
    case is DiT's (a quarter of the channels each for sin and cos of row and column)."""
    emb = sincos_position_embedding((2, 3, 4), 128).reshape(2, 3, 4, 128)
    assert torch.equal(emb[0, :, :, :44], emb[0, :1, :1, :44].expand(3, 4, 44))  # time block: constant over h, w
    assert torch.equal(emb[:, 0, :, 44:86], emb[:1, 0, :, 44:86].expand(2, 4, 42))  # rows: constant over t, w
    torch.testing.assert_close(emb[1, 0, 0, :22], torch.sin(torch.tensor(1.0) * 10_000 ** (-torch.arange(22) / 22)))
    two_d = sincos_position_embedding((3, 5), 64)
    rows = torch.arange(3.0, dtype=D).repeat_interleave(5)[:, None] * 10_000 ** (-torch.arange(16, dtype=D) / 16)
    torch.testing.assert_close(two_d[:, :16], torch.sin(rows).float())


def test_presets_parameter_counts_and_config_errors():
    assert set(VIDEO_PRESETS) == {"video-tiny", "video-S", "video-B"}
    counts = {p: count_parameters(p, f, r) for p, f, r in
              [("video-tiny", 8, 32), ("video-S", 20, 64), ("video-B", 20, 64)]}
    assert counts == {"video-tiny": 1_720_080, "video-S": 44_905_504, "video-B": 179_169_184}  # module docstring
    base = {**VIDEO_PRESETS["video-tiny"], "img_resolution": 32, "img_channels": 1}
    for field, value in [("frames", 0), ("temporal_patch", 3), ("attention", "axial"), ("img_resolution", 30)]:
        with pytest.raises(ValueError, match=field):
            VideoConfig(**{**base, field: value})
    net = build_net(VideoConfig(**base), 0.5)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 32, 32\]"):
        net(torch.randn(2, 1, 32, 32), torch.rand(2))


def test_train_configs_need_a_video_network_with_frames():
    cfg = make_config("video-tiny-8x32-sct", teacher=None)
    assert cfg.shape == (1, 8, 32, 32) and cfg.net.img_shape == cfg.shape
    with pytest.raises(ConfigError, match="frames"):
        make_config("tiny-28-diffusion", overrides=["frames=8"])
    with pytest.raises(ConfigError, match="net_preset"):
        make_config("video-tiny-8x32-diffusion", overrides=["frames=0"])


RUN = ["progress=false", "tensorboard=false", "sample_count=2", "sample_ode_steps=2", "log_every=1", "net.depth=1"]


def test_diffusion_sct_and_scd_train_and_sample_on_clips(tmp_path):
    """Two steps each of the teacher, an sCT student of it and a guided sCD student, on random clips in memory;
    1- and 2-step samples (and the teacher's ODE samples) of the clips' shape, finite."""
    data = ImageData(torch.rand(8, 1, 8, 32, 32) * 2 - 1, torch.arange(8) % 3, "random clips", value_range="raw")
    teacher = tmp_path / "teacher"
    cfg = make_config("video-tiny-8x32-diffusion", None, RUN, out=str(teacher), kimg=0.008, batch=4,
                      conditional=True)
    result = train(cfg, data=data)
    assert result.step == 2 and math.isfinite(result.stats["loss"])
    x, _ = generate(load_run(teacher), 2, Sampler(nfe=3), batch=2, progress=False, class_label=1)
    assert x.shape == (2, 1, 8, 32, 32) and torch.isfinite(x).all()
    for method, extra in [("sct", []), ("scd", ["net.guidance_embed=true", "loss.guidance=1,2"])]:
        source = {"init": str(teacher)} if method == "sct" else {"teacher": str(teacher)}
        cfg = make_config(f"video-tiny-8x32-{method}", None, [*RUN, "loss.warmup_kimg=0.004", *extra],
                          out=str(tmp_path / method), kimg=0.008, batch=4, conditional=True, **source)
        result = train(cfg, data=data)
        assert result.step == 2 and math.isfinite(result.stats["loss"]), method
        run = load_run(tmp_path / method)
        for steps in (1, 2):
            x, _ = generate(run, 3, Sampler(steps=steps), batch=3, progress=False)
            assert x.shape == (3, 1, 8, 32, 32) and torch.isfinite(x).all(), (method, steps)
