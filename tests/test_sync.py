"""The hot path does not wait for the device: a training step reads tensor values once (the skip decision),
logging once every `log_every` steps, and a 2-step sample not at all.

Reads of tensor values (`item`, `tolist`, `__bool__`, `__float__`, `__int__`, `__index__`, `numpy`) are what
force a host-device synchronisation on a GPU. They are counted here, on the CPU, when scm's own code makes them
(torch's internals, e.g. Adam's CPU step counter, are not scm's to change and do not touch the device)."""

import collections
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scm.conditioning import Conditioning
from scm.config import make_config
from scm.generate import image_generators
from scm.nets import build_net, net_config
from scm.sampling import consistency_sample, consistency_times
from scm.train import train

SRC = str(Path(__file__).resolve().parents[1] / "src" / "scm")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
RUN = ["progress=false", "tensorboard=false", "sample_every_kimg=None", "ckpt_every_kimg=1000", "sample_count=2",
       "sample_ode_steps=1"]


@pytest.fixture
def reads(monkeypatch):
    """Counts value reads made by scm's code, by call site (file:line)."""
    sites = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(SRC):
                sites[f"{Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return sites


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_shapes

    root = tmp_path_factory.mktemp("sync")
    images, labels = make_shapes(64)
    np.savez(root / "shapes.npz", x=images[..., 0], y=labels)
    return root / "shapes.npz"


def _run(preset, data, out, steps, extra=(), **flags):
    cfg = make_config(preset, None, [*RUN, "log_every=4", *extra], data=str(data), out=str(out),
                      kimg=steps * 4 / 1000, batch=4, **flags)
    return train(cfg)


@pytest.mark.parametrize("kind", ["diffusion", "sct", "scd-guided"])
def test_a_training_step_reads_values_once(kind, data, tmp_path, reads):
    """Twice the steps cost exactly one read per extra step plus one per extra metrics line: everything else
    (data checks where the data enters, checkpoints, sample grids) is per run, not per step."""
    extra, flags, preset = [], {}, f"tiny-28-{kind}"
    if kind == "scd-guided":
        _run("tiny-28-diffusion", data, tmp_path / "teacher", 4, ["conditional=true", "net.label_dropout=0.1"])
        preset, flags = "tiny-28-scd", {"teacher": str(tmp_path / "teacher")}
        extra = ["conditional=true", "net.guidance_embed=true", "loss.guidance=1.0,2.0", "net.dropout=0.1"]
    counts = []
    for steps in (8, 16):
        reads.clear()
        _run(preset, data, tmp_path / f"{kind}-{steps}", steps, extra, **flags)
        counts.append(dict(reads))
    extra_reads = sum(counts[1].values()) - sum(counts[0].values())
    assert extra_reads == 8 + 2, (counts[0], counts[1])  # 8 more steps, 2 more metrics lines (log_every=4)
    per_step = {k: counts[1].get(k, 0) - counts[0].get(k, 0) for k in counts[1]}
    assert {k for k, v in per_step.items() if v} <= {k for k in counts[1] if k.startswith(("step.py", "logger.py"))}


def test_a_two_step_sample_reads_no_values(reads):
    cfg = net_config("tiny", img_resolution=28, img_channels=1, label_dim=10, guidance_embed=True)
    net = build_net(cfg, 0.5).eval()
    gens = image_generators(0, 0, 6, "cpu")
    noise = 0.5 * torch.stack([torch.randn(1, 28, 28, generator=g) for g in gens])
    cfg = make_config("tiny-28-scd", None, ["conditional=true", "net.guidance_embed=true", "loss.guidance=1,2"],
                      data="x", out="y", teacher="t")
    cond = Conditioning.of_run(cfg).sample_inputs(torch.arange(6))
    x = consistency_sample(net, noise, consistency_times(2), 0.5, generator=gens, **cond)
    assert x.shape == noise.shape
    assert sum(reads.values()) == 0, dict(reads)
