"""torch.compile traces scm's networks whole: the U-Net and the DiT forward (inference, as sampling runs them)
compile without a graph break and give the eager outputs. The captured sampler builds on this."""

import pytest
import torch
import torch._dynamo

from scm.config import make_config
from scm.nets.registry import build_net


@pytest.mark.parametrize("preset, overrides", [("tiny-28-sct", ["net.num_blocks=1", "net.channel_mult=1,2"]),
                                               ("dit-tiny-28-sct", ["net.depth=2"])])
def test_compiled_forward_equals_eager_without_graph_breaks(preset, overrides):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    cfg = make_config(preset, overrides=overrides)
    net = build_net(cfg.net, cfg.loss.sigma_d).eval()
    compiled = torch.compile(net)
    x = torch.randn(4, *cfg.shape)
    with torch.no_grad():
        for t in (torch.full((4,), 1.1), torch.linspace(0.2, 1.5, 4)):  # two calls: the second reuses the graph
            # inductor may fuse and reorder float32 arithmetic: equal to float32 rounding over a dozen layers
            torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-4, atol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()


def test_the_captured_sampler_gives_the_eager_samplers_images(tmp_path):
    """generate(captured=True): the re-noising drawn beforehand from each image's generator and the steps compiled
    as one graph give the eager sampler's images exactly on the CPU (1, 2 and 3 steps, class-conditional, two batch
    shapes). On CUDA (inductor, CUDA graphs) the tolerance is measured by benchmarks/gpu_captured.py."""
    from scm.generate import Sampler, generate
    from scm.runs import network_run

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = make_config("tiny-28-sct", overrides=["net.num_blocks=1", "net.channel_mult=1,2", "conditional=true",
                                                "net.label_dim=10"])
    net = build_net(cfg.net, cfg.loss.sigma_d)
    with torch.no_grad():
        for p in net.parameters():  # a fresh EDM2 network's output layer is zero: make every weight count
            if not p.any():
                p.normal_(0, 0.05)
    run = network_run(cfg, net.state_dict(), source=tmp_path, ema_std=None, step=0)
    for steps in (1, 2, 3):
        eager, _ = generate(run, 6, Sampler(steps=steps), batch=4, seed=3, progress=False)
        captured, _ = generate(run, 6, Sampler(steps=steps), batch=4, seed=3, progress=False, captured=True)
        assert eager.abs().mean() > 1e-3  # not trivially zero
        assert torch.equal(captured, eager), (steps, (captured - eager).abs().max())  # the CPU graph: eager's kernels
    torch._dynamo.reset()
