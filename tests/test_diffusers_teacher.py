"""diffusers models as TrigFlow teachers (scm.diffusers.from_diffusers, scm.teachers.from_flow).

1. Exact algebra: closed-form Gaussian "models" written in each diffusers parameterisation (VP ε / v / x0 on DDPM
   schedules, EDM, rectified flow) wrapped by from_diffusers give the exact TrigFlow F* of the same data.
2. Small random diffusers networks: every first-order diffusers scheduler (DDIM, Euler, EDM Euler, flow-matching
   Euler with shift) is the DDIM step of eq. 26 in its own coordinates, so scm's Euler ODE sampler on the wrapped
   teacher, on the scheduler's own time grid from the same noise, reproduces diffusers' loop; and scm's Heun sampler
   on its own grid converges to the same images.
"""

import json
import math

import pytest
import torch

from scm.conditioning import guided
from scm.sampling import ode_sample
from scm.teachers import from_flow
from scm.trigflow import add_noise

from oracle import Gaussian

diffusers = pytest.importorskip("diffusers")
from scm.diffusers.convert import Parameterization  # noqa: E402
from scm.diffusers.teacher import from_diffusers, load_diffusers, read_diffusers  # noqa: E402
from scm.errors import ConfigError  # noqa: E402

SD = 0.5
G = Gaussian(mu=[0.3, -0.2, 0.1], s=[0.2, 0.5, 0.8], sigma_d=SD)
# inside every schedule's σ range (scaled_linear, the narrowest: σ ∈ [0.029, 14.6]); σ' = (σ_d/k)·tan t ∈ [0.035, 14.1]
TS = [0.07, 0.4, 0.785, 1.2, 1.5]


def _points(ts, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(ts, dtype=torch.float64)
    x0 = G.sample(len(ts), g)
    z = SD * torch.randn(len(ts), G.dim, generator=g, dtype=torch.float64)
    return add_noise(x0, z, t), t


class VPOracle:
    """The ideal DDPM model of y = x0/k: timestep i (fractional, log-linear in σ between steps) → ε, v or x0."""

    def __init__(self, scheduler, k):
        self.log_sigmas = torch.tensor(Parameterization.from_scheduler(scheduler).log_sigmas, dtype=torch.float64)
        self.prediction, self.k = scheduler.config.prediction_type, k

    def __call__(self, x, timestep):
        i = timestep.floor().long().clamp(0, len(self.log_sigmas) - 2)
        w = timestep - i
        sigma = torch.exp((1 - w) * self.log_sigmas[i] + w * self.log_sigmas[i + 1])
        alpha = 1 / torch.sqrt(1 + sigma**2)
        eps, y = G.eps_y(x, alpha, sigma * alpha, self.k)
        a, s = alpha[:, None], (sigma * alpha)[:, None]
        return {"epsilon": eps, "v_prediction": a * eps - s * y, "sample": y}[self.prediction]


class EDMOracle:
    """The ideal EDM network G of y: x_in = c_in·x_σ, c_noise = ¼ ln σ → G with D = c_skip·x_σ + c_out·G."""

    def __init__(self, scheduler, k):
        self.se, self.k = scheduler.config.sigma_data, k
        self.sign = 1 if scheduler.config.prediction_type == "epsilon" else -1

    def __call__(self, x, timestep):
        sigma = torch.exp(4 * timestep)[:, None]
        x_sigma = x * torch.sqrt(sigma**2 + self.se**2)
        _, D = G.eps_y(x_sigma, torch.ones_like(sigma[:, 0]), sigma[:, 0], self.k)
        c_skip = self.se**2 / (sigma**2 + self.se**2)
        c_out = self.sign * sigma * self.se / torch.sqrt(sigma**2 + self.se**2)
        return (D - c_skip * x_sigma) / c_out


class FlowOracle:
    """The ideal flow-matching velocity of y: timestep = s·T → v = E[ε − y | (1 − s)·y + s·ε]."""

    def __init__(self, scheduler, k):
        self.T, self.k = scheduler.config.num_train_timesteps, k

    def __call__(self, x, timestep):
        s = timestep / self.T
        eps, y = G.eps_y(x, 1 - s, s, self.k)
        return eps - y


SCHEDULERS = {
    "ddpm-eps-linear": lambda: diffusers.DDPMScheduler(beta_schedule="linear"),
    "ddpm-v-cosine": lambda: diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    "ddim-sample-scaled": lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="sample"),
    "euler-v-zero-snr": lambda: diffusers.EulerDiscreteScheduler(prediction_type="v_prediction",
                                                                 rescale_betas_zero_snr=True),
    "edm-eps": lambda: diffusers.EDMEulerScheduler(sigma_data=0.5),
    "edm-v": lambda: diffusers.EDMEulerScheduler(sigma_data=0.7, prediction_type="v_prediction"),
    "flow-shift3": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
}
ORACLES = {"vp": VPOracle, "edm": EDMOracle, "flow": FlowOracle}


@pytest.mark.parametrize("data", ["own", "unit"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_closed_form_models_in_every_parameterisation_give_the_exact_F(name, data):
    scheduler = SCHEDULERS[name]()
    kind = Parameterization.from_scheduler(scheduler).kind
    k = 1.0 if data == "own" else SD
    fn = from_diffusers(ORACLES[kind](scheduler, k), scheduler, sigma_d=SD, data=data)
    ts = TS if kind != "flow" else [0.0, *TS, math.pi / 2]  # flow-matching is defined on the closed interval
    x_t, t = _points(ts)
    # float64 throughout; the bar is 1e-6. The conversions divide by sin t / cos t, at most ~1/0.01 here.
    torch.testing.assert_close(fn(x_t / SD, t), G.F_star(x_t / SD, t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("data", ["own", "unit"])
def test_from_flow_conventions(data):
    """from_flow's data="own" (the default: the flow's data is scm's x0) and "unit" (Sana-Sprint: x0/σ_d)."""
    k = 1.0 if data == "own" else SD

    def v(x, s):
        eps, y = G.eps_y(x, 1 - s, s, k)
        return eps - y

    x_t, t = _points([0.0, *TS, math.pi / 2])
    torch.testing.assert_close(from_flow(v, SD, data=data)(x_t / SD, t), G.F_star(x_t / SD, t), atol=1e-12, rtol=1e-12)


def test_sigma_d_is_needed_unless_the_scheduler_records_it():
    with pytest.raises(ConfigError, match="sigma_d"):
        from_diffusers(lambda x, timestep: x, diffusers.DDPMScheduler())
    fn = from_diffusers(lambda x, timestep: x, diffusers.EDMEulerScheduler(sigma_data=0.6))
    assert fn.sigma_d == 0.6


# -- small random diffusers networks ---------------------------------------------------------------------------------
def _unet(channels=3, num_class_embeds=None):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds).eval().double()


def _dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10).eval().double()


def _times(scheduler, kind, k):
    """The scheduler's own grid as TrigFlow times: σ' = (σ_d/k)·tan t, and for flow s = σ'/(1 + σ')."""
    if kind == "vp" and not hasattr(scheduler, "sigmas"):  # DDIM: σ of its integer timesteps
        acp = scheduler.alphas_cumprod.double()[scheduler.timesteps]
        sig = torch.sqrt((1 - acp) / acp)
    else:
        sig = scheduler.sigmas.double()
        sig = sig[sig > 0]
        if kind == "flow":
            sig = sig / (1 - sig)
    return torch.atan(k * sig / SD)


def _diffusers_loop(model, scheduler, x, cond):
    """The standard diffusers sampling loop (as its pipelines run it). EDM schedulers precondition inside
    scale_model_input (c_in) and step (c_skip, c_out); their timesteps are c_noise = ¼ ln σ."""
    for tau in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, tau) if hasattr(scheduler, "scale_model_input") else x
        out = model(inp, tau.expand(len(x)), **cond).sample[:, : x.shape[1]]
        x = scheduler.step(out, tau, x).prev_sample
    return x


LOOPS = {  # name: (scheduler, its steps, network)
    # DDIM steps from τ to τ − T/steps: with "leading" spacing and steps dividing T, that is the next timestep
    "ddim-eps": (lambda: diffusers.DDIMScheduler(clip_sample=False), 50, _unet),
    "euler-v": (lambda: diffusers.EulerDiscreteScheduler(prediction_type="v_prediction",
                                                         timestep_spacing="trailing"), 60, _unet),
    "edm-euler": (lambda: diffusers.EDMEulerScheduler(sigma_data=0.5), 60, _unet),
    "flow-euler-shift3": (lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 60, _unet),
    "dit-ddim-labels": (lambda: diffusers.DDIMScheduler(clip_sample=False), 40, _dit),
}


@pytest.mark.parametrize("data", ["own", "unit"])
@pytest.mark.parametrize("name", list(LOOPS))
def test_scm_euler_on_the_wrapped_teacher_reproduces_diffusers_loop(name, data):
    make_scheduler, steps, make_net = LOOPS[name]
    scheduler, model = make_scheduler(), make_net()
    scheduler.set_timesteps(steps)
    kind = Parameterization.from_scheduler(scheduler).kind
    k = 1.0 if data == "own" else SD
    C = model.config.in_channels
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, C, 8, 8, generator=g, dtype=torch.float64)
    cond = {"class_labels": torch.tensor([3, 7])} if make_net is _dit else {}
    ts = _times(scheduler, kind, k)
    # the same starting point: diffusers' latents, in TrigFlow's x_t = a·y + b·ε (a = k cos t, b = σ_d sin t)
    a, b = k * math.cos(ts[0]), SD * math.sin(ts[0])
    if kind == "flow":
        x_start, x_t = noise, noise * (a + b)
    elif isinstance(scheduler, diffusers.DDIMScheduler):
        x_start, x_t = noise, noise * math.hypot(a, b)
    else:  # Euler and EDM samplers run on x_σ = x_t/a
        x_start = noise * scheduler.init_noise_sigma
        x_t = x_start * a
    y_diffusers = _diffusers_loop(model, scheduler, x_start, cond)
    fn = from_diffusers(model, scheduler, sigma_d=SD, data=data)
    labels = {"labels": cond["class_labels"]} if cond else {}
    x0 = ode_sample(fn, x_t, ts.tolist(), SD, solver="euler", **labels)
    # The same algorithm in exact arithmetic; float64, so differences are rounding of the time grid (diffusers keeps
    # σ in float32: relative 1e-7 per step, amplified by the steps' Lipschitz factors) — 1e-5 of the image scale.
    torch.testing.assert_close(x0 / k, y_diffusers, atol=1e-5, rtol=1e-5)


def test_scm_heun_converges_to_diffusers_many_step_loop():
    """Different solvers and grids on one ODE: diffusers' flow-matching Euler at 400 steps (shift 3; within 2e-4 of
    its 3200-step result) against scm's Heun on EDM grids of 40 and 80 steps. scm's error halves as its steps
    double (measured 5.3e-3 → 2.6e-3 relative): a random network's sinusoidal embedding of s·1000 varies on a
    scale of ~0.006 in s, which neither grid resolves, so the convergence is first-order here, not Heun's second."""
    scheduler, model = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), _unet()
    scheduler.set_timesteps(400)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = _diffusers_loop(model, scheduler, noise, {})
    fn = from_diffusers(model, scheduler, sigma_d=SD)
    errors = []
    for n in (40, 80):
        sigmas = torch.logspace(math.log10(80), math.log10(0.002), n - 1).tolist()
        ts = [math.pi / 2] + [math.atan(s / SD) for s in sigmas]
        x0 = ode_sample(fn, noise * SD, ts, SD, solver="heun")  # at t = π/2, x_t = σ_d·ε
        errors.append(float((x0 - y).abs().max() / y.abs().max()))
    assert errors[1] < errors[0] / 1.5 and errors[1] < 4e-3, errors


def test_guidance_uses_the_dit_null_class():
    model = _dit()
    scheduler = diffusers.DDIMScheduler()
    fn = from_diffusers(model, scheduler, sigma_d=SD)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.5, 1.0], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    F_c, F_u = fn(x, t, labels=labels), fn(x, t, labels=None)  # None → the null class (index 10)
    F_10 = fn(x, t, labels=torch.tensor([10, 10]))
    torch.testing.assert_close(F_u, F_10)
    torch.testing.assert_close(guided(fn, {"labels": None})(x, t, guidance=3.0, labels=labels), F_u + 3.0 * (F_c - F_u))


def test_guided_class_labels_take_one_call_where_the_model_has_a_null_class():
    """DiT's null class takes scm's NO_CLASS rows (-1): the guided evaluation is one call on the stacked batch and
    equals the two calls' F_s (float64; the tolerance is float64's summation order over a 4-row instead of a
    2-row batch). A U-Net without a null class keeps two calls (and its None is still refused by name)."""
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.5, 1.0], dtype=torch.float64)
    labels, s = torch.tensor([1, 2]), torch.tensor([1.5, 3.0], dtype=torch.float64)
    fn = from_diffusers(_dit(), diffusers.DDIMScheduler(), sigma_d=SD)
    calls = []

    def counted(x, t, **cond):
        calls.append(x.shape[0])
        return fn(x, t, **cond)

    counted.reads_no_class = fn.reads_no_class
    one = guided(counted, {"labels": None})(x, t, guidance=s, labels=labels)
    two = guided(counted, {"labels": None}, one_call=False)(x, t, guidance=s, labels=labels)
    assert fn.reads_no_class and calls == [4, 2, 2]
    torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)
    unet = from_diffusers(_unet(num_class_embeds=4), diffusers.DDPMScheduler(), sigma_d=SD)
    assert not unet.reads_no_class
    with pytest.raises(ConfigError, match="null_label"):  # two calls: the unconditional one refused as before
        guided(unet, {"labels": None})(torch.randn(1, 3, 8, 8, dtype=torch.float64), t[:1], guidance=2.0,
                                       labels=torch.tensor([1]))


def test_unconditional_unet_refuses_labels_and_conditional_one_without_null_class_says_so():
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(ConfigError, match="unconditional"):
        from_diffusers(_unet(), diffusers.DDPMScheduler(), sigma_d=SD)(x, t, labels=torch.tensor([1]))
    with pytest.raises(ConfigError, match="null_label"):
        from_diffusers(_unet(num_class_embeds=4), diffusers.DDPMScheduler(), sigma_d=SD)(x, t)


# -- loading from folders ------------------------------------------------------------------------------------------
def test_load_diffusers_from_pipeline_and_model_folders(tmp_path):
    model, scheduler = _unet().float(), diffusers.DDIMScheduler(prediction_type="v_prediction")
    model.save_pretrained(tmp_path / "pipe" / "unet")
    scheduler.save_pretrained(tmp_path / "pipe" / "scheduler")
    (tmp_path / "pipe" / "model_index.json").write_text(
        '{"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"], '
        '"scheduler": ["diffusers", "DDIMScheduler"]}')
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        loaded = load_diffusers(path)
        assert loaded.parameterization.prediction == "v_prediction" and read_diffusers(path).shape == (3, 8, 8)
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 1.2])
        torch.testing.assert_close(from_diffusers(loaded.model, loaded.scheduler, sigma_d=SD)(x, t),
                                   from_diffusers(model, scheduler, sigma_d=SD)(x, t))


def test_load_diffusers_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        load_diffusers(tmp_path / "missing")
    _unet().float().save_pretrained(tmp_path / "m", safe_serialization=False)  # a pickle .bin only
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="safetensors"):
        load_diffusers(tmp_path / "m")
    _unet().float().save_pretrained(tmp_path / "n")
    with pytest.raises(ConfigError, match=r"scheduler_config\.json"):
        load_diffusers(tmp_path / "n")
    (tmp_path / "n" / "scheduler_config.json").write_text('{"_class_name": "NoSuchScheduler"}')
    with pytest.raises(ConfigError, match="NoSuchScheduler"):
        load_diffusers(tmp_path / "n")


# -- the command line: scm train --teacher diffusers:PATH ------------------------------------------------------------
def _pipeline_folder(root, model, scheduler):
    model.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_cli_distils_a_diffusers_pipeline_into_its_own_network(tmp_path):
    """sCD from a diffusers pipeline folder: the student is the teacher's network (TrigFlow in/out, w_φ head), its
    run samples without the folder, and a teacher of another shape is refused by name."""
    import numpy as np

    from scm.runs import load_run

    from conftest import cli, make_shapes

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    pipe = _pipeline_folder(tmp_path / "pipe", unet, diffusers.DDPMScheduler(prediction_type="v_prediction"))
    images, _ = make_shapes(n=32, res=16)
    np.savez(tmp_path / "d.npz", x=images[..., 0])
    run = tmp_path / "run"
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", tmp_path / "d.npz", "--out", run, "--teacher",
                     f"diffusers:{pipe}", "--kimg", 0.032, "--batch", 8, "resolution=16", "progress=false",
                     "tensorboard=false", "sample_count=4")
    assert code == 0, text
    assert "initialized from the diffusers teacher" in text and "measured std" in text
    loaded = load_run(run)
    assert loaded.cfg.net_preset == "diffusers" and loaded.cfg.net.model_class == "UNet2DModel"
    record = json.loads((run / "teacher.json").read_text())  # σ_d given, the data's std measured and recorded
    assert record["sigma_d"] == 0.5 and 0.1 < record["data_std"] < 1 and record["scheduler"] == "DDPMScheduler"
    code, text = cli("sample", "--ckpt", run, "--steps", 2, "--n", 3, "--out", tmp_path / "s.npz")
    assert code == 0, text
    np.savez(tmp_path / "d28.npz", x=make_shapes(n=8, res=28)[0][..., 0])  # data of another shape than the teacher
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", tmp_path / "d28.npz", "--out", tmp_path / "r2",
                     "--teacher", f"diffusers:{pipe}", "--kimg", 0.032, "progress=false")
    assert code == 2 and "16×16×1" in text, text
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", tmp_path / "d.npz", "--out", tmp_path / "r3",
                     "--teacher", f"diffusers:{tmp_path / 'nothing'}", "resolution=16", "progress=false")
    assert code == 2 and "no such folder" in text, text
