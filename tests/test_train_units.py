"""Unit tests of the training engine's pieces: power-function EMA, learning-rate schedule, batch plan, config
coercion, and the training state's save/load."""

import math

import pytest
import torch
from torch import nn

from scm.config import ConfigError, OptimConfig, coerce, from_dict, make_config, to_dict
from scm.ema_profile import std_to_exp
from scm.runs import RunDir
from scm.train.batches import BatchPlan
from scm.train.distributed import DistInfo
from scm.train.ema import PowerEMA
from scm.train.optim import learning_rate
from scm.train.state import TrainState


# -- power-function EMA (Karras et al. 2024, EDM2 §3.1) ------------------------------------------------------------
def test_std_to_exp_matches_edm2():
    """EDM2 §3.1: σ_rel = 0.05 ↔ γ = 16.97 and σ_rel = 0.10 ↔ γ = 6.94 (quoted to two decimals)."""
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.005)
    for std in (0.01, 0.05, 0.1, 0.2):  # and it inverts σ_rel(γ) = sqrt((γ + 1)/((γ + 2)²(γ + 3)))
        g = std_to_exp(std)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(std, rel=1e-10)


def test_power_ema_equals_its_closed_form():
    """After T updates with batch 1, ema_T = Σ_τ (1 − β_τ)·(τ/T)^(γ+1)·θ_τ, β_τ = (1 − 1/τ)^(γ+1) (the recursion's
    product telescopes); its weights tend to EDM2's τ^γ profile. Checked in float64 on a parameter trajectory."""
    net = nn.Linear(1, 1, bias=False).double()
    ema = PowerEMA(net, (0.05, 0.2))
    thetas = [math.sin(0.3 * k) + 0.01 * k for k in range(1, 201)]
    for k, theta in enumerate(thetas, start=1):
        with torch.no_grad():
            net.weight.fill_(theta)
        ema.update(net, k, 1)
    T = len(thetas)
    for std in (0.05, 0.2):
        g = std_to_exp(std)
        weights = [(1 - (1 - 1 / tau) ** (g + 1)) * (tau / T) ** (g + 1) for tau in range(1, T + 1)]
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        expected = sum(w * th for w, th in zip(weights, thetas, strict=True))
        # the shadow copy is float32: its rounding over 200 lerps stays below 1e-6
        assert ema.weights(std)["weight"].item() == pytest.approx(expected, abs=1e-6)
        power = [tau**g for tau in range(1, T + 1)]
        approx = sum(p * th for p, th in zip(power, thetas, strict=True)) / sum(power)
        assert expected == pytest.approx(approx, abs=0.02)  # the τ^γ profile, up to O(γ/T)


# -- learning rate (EDM2 eq. 67, with a linear ramp-up) ---------------------------------------------------------------
def test_learning_rate_schedule():
    cfg = OptimConfig(lr=1e-2, lr_decay_kimg=100.0, lr_rampup_kimg=10.0)
    assert learning_rate(cfg, 0.0) == 0.0
    assert learning_rate(cfg, 5.0) == pytest.approx(5e-3)          # half-way through the ramp-up
    assert learning_rate(cfg, 50.0) == pytest.approx(1e-2)         # flat until t_ref
    assert learning_rate(cfg, 400.0) == pytest.approx(1e-2 / 2)    # α_ref / sqrt(t / t_ref)
    assert learning_rate(OptimConfig(lr=3e-4), 1e6) == 3e-4        # no schedule: constant


# -- the batch plan ----------------------------------------------------------------------------------------------------
def test_batch_plan_covers_every_example_once_per_epoch_and_is_split_free():
    plan = BatchPlan(num_examples=10, batch=4, seed=3)
    seen = torch.cat([plan.indices(s) for s in range(5)])           # 20 positions = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])                     # a new permutation each epoch
    for step in range(5):                                            # slots partition the global batch …
        whole = plan.indices(step)
        assert torch.equal(torch.cat([plan.slot(step, s, 2) for s in range(2)]), whole)
        assert torch.equal(torch.cat([plan.slot(step, s, 4) for s in range(4)]), whole)
    again = BatchPlan(10, 4, 3)                                      # … and depend on (seed, step) only
    assert all(torch.equal(plan.indices(s), again.indices(s)) for s in (4, 0, 2))
    assert not torch.equal(BatchPlan(10, 4, 4).indices(0), plan.indices(0))
    a = torch.randn(3, generator=plan.noise_generator(7, 1, "cpu"))
    assert torch.equal(a, torch.randn(3, generator=again.noise_generator(7, 1, "cpu")))
    assert plan.dropout_seed(7, 1) != plan.dropout_seed(7, 0) != plan.dropout_seed(8, 0)


# -- configuration ---------------------------------------------------------------------------------------------------
def test_config_coercion():
    assert coerce("0.9,0.99", tuple[float, float], "k") == (0.9, 0.99)
    assert coerce("0.05", tuple[float, ...], "k") == (0.05,)
    assert coerce("none", float | None, "k") is None and coerce("2", float | None, "k") == 2.0
    assert coerce("3.0", int, "k") == 3 and coerce("1e3", int, "k") == 1000
    assert coerce("off", bool, "k") is False and coerce("Yes", bool, "k") is True
    for value, tp, what in (("abc", int, "an integer"), ("2.5", int, "an integer"), (True, int, "an integer"),
                            ("maybe", bool, "true or false"), ("1,2,3", tuple[float, float], "2 comma-separated")):
        with pytest.raises(ConfigError, match=what):
            coerce(value, tp, "k")


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    cfg = make_config("img512-M-scd", None, ["loss.tangent_precision=fp32"], data="d", out="o", teacher="t")
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.loss.guidance == (1.0, 2.0) and cfg.loss.tangent_precision == "fp32" and cfg.net.guidance_embed
    bad = to_dict(cfg)
    bad["loss"]["warmup"] = 3
    with pytest.raises(ConfigError, match="unknown config key 'warmup'"):
        from_dict(bad)


def test_preset_family_without_method_names_its_methods():
    family = r"'tiny-28' is a family of presets: choose its method \(diffusion, sct, scd\)"
    with pytest.raises(ConfigError, match=family):
        make_config("tiny-28")
    assert make_config("tiny-28", "sct", data="d", out="o").preset == "tiny-28-sct"


# -- the training state ------------------------------------------------------------------------------------------------
def test_train_state_saves_and_loads_everything(tmp_path):
    cfg = make_config("tiny-28-sct", None, ["ema.stds=0.05,0.1"], data="d", out=str(tmp_path))
    info = DistInfo()

    def fresh(seed):
        torch.manual_seed(seed)
        return TrainState.create(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), cfg, info)

    state = fresh(0)
    for k in range(3):  # a few real optimizer and EMA steps
        state.model(torch.randn(5, 3)).square().mean().backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.ema.update(state.net, 5 * (k + 1), 5)
    state.step, state.cur_nimg, state.bad_steps, state.bad_run = 3, 15, 2, 1
    path = state.save(RunDir(tmp_path), keep=2, info=info)
    other = fresh(1)
    other.load(path)
    assert (other.step, other.cur_nimg, other.bad_steps, other.bad_run) == (3, 15, 2, 1)
    for a, b in zip(state.net.state_dict().values(), other.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(v, other.ema.state_dict()[k]) for k, v in state.ema.state_dict().items())
    sa, sb = state.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
