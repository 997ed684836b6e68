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
