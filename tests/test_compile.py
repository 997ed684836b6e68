"""torch.compile traces scm's networks whole: the U-Net and the DiT forward (inference, as sampling runs them), with
self-attention and the text networks' masked cross-attention, compile as one graph (`fullgraph=True` raises on any
graph break) and give the eager outputs. The captured sampler builds on this."""

import pytest
import torch
import torch._dynamo

from scm.config import make_config
from scm.nets.registry import build_net


def _prompt(cfg, batch: int) -> dict:
    """A padded prompt of 6 tokens (row 0 all padding, as an empty prompt) for a text network, else nothing."""
    if not cfg.net.text_dim:
        return {}
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(6)[None, :] < torch.tensor([0, 6, 3, 1])[:batch, None]
    return {"text": torch.randn(batch, 6, cfg.net.text_dim, generator=g), "text_mask": mask,
            "text_pooled": torch.randn(batch, cfg.net.text_pooled_dim, generator=g)}


@pytest.mark.parametrize("preset, overrides", [
    ("tiny-28-sct", ["net.num_blocks=1", "net.channel_mult=1,2", "net.attn_resolutions=14"]),  # self-attention
    ("dit-tiny-28-sct", ["net.depth=2"]),
    ("dit-tiny-text-28-sct", ["net.depth=1"]),                     # masked cross-attention to the prompt
    ("tiny-text-28-sct", ["net.num_blocks=1"])])
def test_compiled_forward_is_one_graph_equal_to_eager(preset, overrides):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = make_config(preset, overrides=overrides)
    net = build_net(cfg.net, cfg.loss.sigma_d).eval()
    with torch.no_grad():
        for p in net.parameters():  # a fresh EDM2 network's output layer is zero: make every weight count
            if not p.any():
                p.normal_(0, 0.05)
    compiled = torch.compile(net, fullgraph=True)
    x, cond = torch.randn(4, *cfg.shape), _prompt(cfg, 4)
    with torch.no_grad():
        for t in (torch.full((4,), 1.1), torch.linspace(0.2, 1.5, 4)):  # two calls: the second reuses the graph
            eager = net(x, t, **cond)
            assert eager.abs().mean() > 1e-3  # not trivially zero
            # inductor may fuse and reorder float32 arithmetic: equal to float32 rounding over a dozen layers
            torch.testing.assert_close(compiled(x, t, **cond), eager, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_the_captured_sampler_gives_the_eager_samplers_images(tmp_path):
    """generate(captured=True): the re-noising drawn beforehand from each image's generator and the steps compiled
    as one graph (self-attention included) give the eager sampler's images exactly on the CPU (1, 2 and 3 steps,
    class-conditional, two batch shapes). On CUDA (inductor, CUDA graphs) the tolerance is measured by
    benchmarks/gpu_captured.py."""
    from scm.generate import Sampler, generate
    from scm.runs import network_run

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = make_config("tiny-28-sct", overrides=["net.num_blocks=1", "net.channel_mult=1,2", "net.attn_resolutions=14",
                                                "conditional=true", "net.label_dim=10"])
    net = build_net(cfg.net, cfg.loss.sigma_d)
    with torch.no_grad():
        for p in net.parameters():  # a fresh EDM2 network's output layer is zero: make every weight count
            if not p.any():
                p.normal_(0, 0.05)
    run = network_run(cfg, net.state_dict(), source=tmp_path, ema_std=None, step=0)
    torch._dynamo.utils.counters.clear()
    for steps in (1, 2, 3):
        eager, _ = generate(run, 6, Sampler(steps=steps), batch=4, seed=3, progress=False)
        captured, _ = generate(run, 6, Sampler(steps=steps), batch=4, seed=3, progress=False, captured=True)
        assert eager.abs().mean() > 1e-3  # not trivially zero
        assert torch.equal(captured, eager), (steps, (captured - eager).abs().max())  # the CPU graph: eager's kernels
    # one graph: nothing fell back to eager (a graph break is counted under one of these keys, by torch version)
    breaks = {k: dict(torch._dynamo.utils.counters[k]) for k in ("graph_break", "unimplemented")}
    assert not any(breaks.values()), breaks
    torch._dynamo.reset()


def test_the_captured_sampler_holds_more_graphs_than_dynamos_default(tmp_path):
    """A graph per batch shape: past dynamo's default limit of 8 recompilations a new shape would run eagerly, with
    only a log line; the captured sampler makes room (`scm serve` alone makes up to 21)."""
    from scm.generate import Sampler, generate
    from scm.runs import network_run

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = make_config("tiny-28-sct", overrides=["net.num_blocks=1", "net.channel_mult=1"])
    net = build_net(cfg.net, cfg.loss.sigma_d)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    run = network_run(cfg, net.state_dict(), source=tmp_path, ema_std=None, step=0)
    torch._dynamo.utils.counters.clear()
    for n in range(1, 11):
        generate(run, n, Sampler(steps=1), batch=n, progress=False, captured=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 10
    eager, _ = generate(run, 10, Sampler(steps=1), batch=10, progress=False)
    captured, _ = generate(run, 10, Sampler(steps=1), batch=10, progress=False, captured=True)
    assert torch.equal(captured, eager)
    torch._dynamo.reset()
