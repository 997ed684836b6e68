"""The audio transformer (`scm.nets.audio`): exact JVP (float64 central differences), shapes, tokens and positions,
a fresh network, presets, config errors, and a few-step diffusion/sCT/sCD run with sampling on in-memory
waveforms [N, 1, 16000]. Runs in ~2 s on two idle CPU threads (both files: 4.6 s)."""

import math

import pytest
import torch
from test_video_net import RUN

from scm.config import make_config
from scm.data.images import ImageData
from scm.errors import ConfigError
from scm.generate import Sampler, generate
from scm.nets import AUDIO_PRESETS, AudioConfig, AudioTransformer, build_net, net_config
from scm.nets.audio import count_parameters
from scm.runs import load_run
from scm.train import train

from conftest import assert_exact_jvp, fill_zero_weights

D = torch.float64


def _net(seed: int = 0) -> AudioTransformer:
    """A small float64 audio net (1×256 waveforms, 16-sample patches: 16 tokens) whose zero-initialized weights
    are filled with random values (a fresh net's F ≡ 0 would test nothing)."""
    torch.manual_seed(seed)
    cfg = net_config("audio-tiny", length=256, patch_size=16, img_channels=1, depth=2, label_dim=3,
                     guidance_embed=True)
    net = build_net(cfg, 0.5).double().eval()
    fill_zero_weights(net, seed + 1)
    return net


def test_jvp_in_x_and_t_equals_central_differences():
    net = _net()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 256, generator=g, dtype=D), torch.tensor([0.05, 0.8, 1.52], dtype=D)
    labels, s = torch.tensor([2, 0, 1]), torch.tensor([1.0, 1.5, 2.0], dtype=D)
    fn = lambda u, c: net(u, c, labels, guidance=s)  # noqa: E731
    primals = [x, t]
    tangents = [torch.randn(3, 1, 256, generator=g, dtype=D), torch.tensor([1.0, -0.5, 0.3], dtype=D)]
    assert_exact_jvp(fn, primals, tangents)


def test_fresh_net_shapes_tokens_and_weight():
    net = build_net(net_config("audio-tiny", length=16000, img_channels=1, label_dim=10, guidance_embed=True), 0.5)
    x, t = torch.randn(2, 1, 16000), torch.rand(2) * 1.5
    F, w = net(x, t, torch.tensor([1, 2]), guidance=2.0, return_weight=True)
    assert F.shape == x.shape and w.shape == (2,) and torch.isfinite(F).all() and torch.isfinite(w).all()
    assert torch.equal(F, torch.zeros_like(F))  # zero gates and output layer: a fresh net gives F = 0
    assert net.grid == (250,) and net.pos_embed.shape == (250, 128)
    tokens = net.patchify(x)
    assert tokens.shape == (2, 250, 64) and torch.equal(net.unpatchify(tokens), x)
    assert torch.equal(tokens[:, 3], x[:, 0, 192:256])  # token i: samples 64i … 64i + 63
    stereo = build_net(net_config("audio-tiny", length=256, img_channels=2), 0.5)
    y = torch.randn(1, 2, 256)
    assert torch.equal(stereo.unpatchify(stereo.patchify(y)), y) and stereo(y, torch.rand(1)).shape == y.shape


def test_presets_parameter_counts_and_config_errors():
    assert set(AUDIO_PRESETS) == {"audio-tiny", "audio-B"}
    assert {p: count_parameters(p) for p in AUDIO_PRESETS} == {"audio-tiny": 1_270_080, "audio-B": 32_486_944}
    base = {**AUDIO_PRESETS["audio-tiny"], "img_channels": 1}
    for field, value in [("length", 0), ("length", 16001), ("patch_size", 0)]:
        with pytest.raises(ValueError, match=field):
            AudioConfig(**{**base, field: value})
    net = build_net(AudioConfig(**base), 0.5)
    with pytest.raises(ValueError, match=r"\[B, 1, 16000\]"):
        net(torch.randn(2, 1, 8000), torch.rand(2))


def test_train_configs_need_an_audio_network_with_a_length():
    cfg = make_config("audio-tiny-16k-sct")
    assert cfg.shape == (1, 16000) and cfg.net.img_shape == cfg.shape
    with pytest.raises(ConfigError, match="length"):
        make_config("dit-tiny-28-diffusion", overrides=["length=16000"])
    with pytest.raises(ConfigError, match="net_preset"):
        make_config("audio-tiny-16k-diffusion", overrides=["length=0"])


def test_diffusion_sct_and_scd_train_and_sample_on_waveforms(tmp_path):
    """Two steps each of the teacher, an sCT student of it and a guided sCD student, on random waveforms in
    memory; 1- and 2-step samples (and the teacher's ODE samples) of the waveforms' shape, finite."""
    data = ImageData(torch.rand(8, 1, 16000) * 2 - 1, torch.arange(8) % 3, "random waveforms", value_range="raw",
                     media={"sample_rate": 16000})
    teacher = tmp_path / "teacher"
    cfg = make_config("audio-tiny-16k-diffusion", None, RUN, out=str(teacher), kimg=0.008, batch=4,
                      conditional=True)
    result = train(cfg, data=data)
    assert result.step == 2 and math.isfinite(result.stats["loss"])
    x, _ = generate(load_run(teacher), 2, Sampler(nfe=3), batch=2, progress=False, class_label=1)
    assert x.shape == (2, 1, 16000) and torch.isfinite(x).all()
    for method, extra in [("sct", []), ("scd", ["net.guidance_embed=true", "loss.guidance=1,2"])]:
        source = {"init": str(teacher)} if method == "sct" else {"teacher": str(teacher)}
        cfg = make_config(f"audio-tiny-16k-{method}", None, [*RUN, "loss.warmup_kimg=0.004", *extra],
                          out=str(tmp_path / method), kimg=0.008, batch=4, conditional=True, **source)
        result = train(cfg, data=data)
        assert result.step == 2 and math.isfinite(result.stats["loss"]), method
        run = load_run(tmp_path / method)
        for steps in (1, 2):
            x, _ = generate(run, 3, Sampler(steps=steps), batch=3, progress=False)
            assert x.shape == (3, 1, 16000) and torch.isfinite(x).all(), (method, steps)
