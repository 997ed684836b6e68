"""LoRA students (scm.diffusers.lora): peft adapters on a diffusers teacher's own network, the teacher being the same
network with its adapters off.

1. Per family (the tiny random configs of test_diffusers_t2i.py): a fresh LoRA student is its teacher; once its
   adapters and guidance input are trained (perturbed here), the network with them off (`BaseTeacher`) is still the
   teacher exactly; only adapters, heads and what the teacher lacks are trainable; the JVP through the adapters
   equals a float64 central difference.
2. On the command line (SD3 and Sana, captioned MNIST): `scm train … lora.rank=4` → checkpoints and EMA hold the
   trained tensors only, the base stays the teacher's; resume is bit-exact; post-hoc EMA, `scm verify`, `scm sample`
   and `scm export` (SCMPipeline round trip; diffusers' LoRA file loaded with the pipeline's `load_lora_weights`; a
   merged export) work; two DDP / FSDP2 processes end with one process's adapters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scm.generate import Sampler, generate
from scm.tangents import jvp_tangent

from conftest import central_difference, cli, jvp_both

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_diffusers_t2i import CASES, SD, _close, _inputs, _model, _prompts  # noqa: E402
from test_diffusers_t2i_train import FAMILIES, _folder  # noqa: E402

from scm.diffusers import from_diffusers, student_from_diffusers  # noqa: E402
from scm.diffusers.lora import BaseTeacher  # noqa: E402
from scm.lora_config import LoRAConfig  # noqa: E402
from scm.runs import RunDir, load_run  # noqa: E402

TESTS = Path(__file__).parent
RUN = ["progress=false", "tensorboard=false", "sample_count=2"]


def _student(name, dtype=torch.float32, rank=2):
    model, scheduler = _model(name, dtype), CASES[name][1]()
    net = student_from_diffusers(model, scheduler, sigma_d=SD, guidance_embed=True, shape=CASES[name][2],
                                 lora=LoRAConfig(rank=rank)).eval()
    teacher = from_diffusers(model, scheduler, sigma_d=SD, **({"guidance": 3.5} if name == "flux-dev" else {}))
    return net, teacher


def _train_(net, scale=0.1):
    """What training changes, made non-trivial: adapters (B ≠ 0), heads and the student's guidance input."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- 1. the student, its teacher and its tangent ---------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_adapters_off_is_the_teacher_and_only_adapters_train(name):
    net, teacher = _student(name)
    cond, (x, t) = _prompts(name), _inputs(name)
    s = 3.5
    with torch.no_grad():
        ref = teacher(x, t, **cond)
        _close(net(x, t, guidance=s, **cond), ref, 1e-5)  # B = 0: a fresh student is its teacher (scm attention)
        _train_(net)
        trained = net(x, t, guidance=s, **cond)
        base = BaseTeacher(net)(x, t, **({"guidance": s} if name == "flux-dev" else {}), **cond)
    assert (trained - ref).abs().max() > 1e-3 * ref.abs().max()  # the adapters do change the student …
    _close(base, ref, 1e-5)                                       # … and switched off leave the teacher's F
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert frozen and all(".lora_" not in n for n in frozen)
    assert all(".lora_" in n or not n.startswith("model.") or ".guidance_embedder." in n for n in trainable)
    assert set(net.trained_keys()) == {n for n, _ in net.named_parameters() if n in trainable} | {
        k for k in net.state_dict() if not k.startswith("model.") and k not in dict(net.named_parameters())}
    own_new = name in ("flux-schnell", "sana")  # their guidance embedder is switched on for the student
    assert any(".guidance_embedder." in n for n in trainable) == own_new


@pytest.mark.parametrize("name", CASES)
def test_lora_student_jvp_matches_float64_finite_differences(name):
    """As test_diffusers_t2i's JVP test (same tolerance and reasons), with the adapters non-zero: the tangent goes
    through peft's LoRA layers (base + scaled B·A) with no rule of scm's."""
    net, _ = _student(name, torch.float64)
    _train_(net)
    cond, (x, t) = _prompts(name, torch.float64), _inputs(name, torch.float64)
    dxdt = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fn = lambda u, s, **c: net(u, s, guidance=2.0, **c)  # noqa: E731
    _, ref = jvp_tangent(fn, SD * x, t, dxdt, SD, method="finite_difference", fd_step=1e-6, **cond)
    for method in ("forward_ad", "func"):
        _close(jvp_tangent(fn, SD * x, t, dxdt, SD, method=method, **cond)[1], ref, 1e-6)


def test_jvp_in_the_direction_of_the_adapters_weights():
    """The tangent with respect to an adapter's own weights (peft's layer is the same in every family: one is
    enough), against a float64 central difference (conftest's tolerance reasoning)."""
    name = "sd3"
    net, _ = _student(name, torch.float64)
    _train_(net)
    cond, (x, t) = _prompts(name, torch.float64), _inputs(name, torch.float64)
    lora_a = next(p for n, p in net.named_parameters() if ".lora_A." in n)
    direction = torch.randn(lora_a.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def of_adapter(w):
        return torch.func.functional_call(net, {n: w for n, p in net.named_parameters() if p is lora_a},
                                          (x, t), dict(guidance=2.0, **cond))

    _close(jvp_both(of_adapter, (lora_a.detach(),), (direction,)),
           central_difference(of_adapter, (lora_a.detach(),), (direction,)), 1e-6)


def test_bad_lora_settings_are_named():
    from scm.config import make_config
    from scm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora\.rank"):
        make_config("tiny-28-sct", None, ["lora.rank=4"])
    with pytest.raises(ConfigError, match="lora"):
        make_config("tiny-28-scd", None, ["lora.rank=-1", "teacher=diffusers:/x"])
    with pytest.raises(ConfigError, match=r"lora\.targets"):
        student_from_diffusers(_model("sd3"), CASES["sd3"][1](), sigma_d=SD, shape=CASES["sd3"][2],
                               lora=LoRAConfig(rank=2, targets=("no_such_layer",)))


# -- 2. on the command line --------------------------------------------------------------------------------------------
def _train(data, folder, run, kimg, *extra):
    return cli("train", "--preset", "tiny-28-scd", "--data", data, "--out", run, "--teacher", f"diffusers:{folder}",
               "--kimg", kimg, "--batch", 8, "loss.guidance=1,3", "net.guidance_embed=true", "lora.rank=4",
               "ema.snapshot_kimg=0.008", "ckpt_every_kimg=0.008", "sample_every_kimg=None", *RUN, *extra)


@pytest.fixture(scope="module")
def lora_run(captioned, tmp_path_factory):
    """An SD3 teacher folder and a 3-step LoRA run on it, with a 2-step run resumed to the same end."""
    data, _ = captioned
    root = tmp_path_factory.mktemp("lora")
    make_model, make_scheduler = FAMILIES["sd3"]
    torch.manual_seed(0)
    folder = _folder(root / "pipe", make_model(), make_scheduler())
    code, text = _train(data, folder, root / "run", 0.024)
    assert code == 0, text
    assert "LoRA rank 4" in text and "M trained)" in text, text
    assert _train(data, folder, root / "split", 0.016)[0] == 0
    code, text = _train(data, folder, root / "split", 0.024, "--resume")
    assert code == 0 and "resumed from" in text, text
    return data, folder, root


def test_checkpoints_hold_the_adapters_and_the_base_stays_the_teachers(lora_run):
    _, folder, root = lora_run
    ckpt = RunDir(root / "run").latest()
    net_file = load_file(ckpt / "net.safetensors")
    assert net_file and all(".lora_" in k or not k.startswith("model.") for k in net_file)
    assert all(k.split("/", 1)[1] in net_file for k in load_file(ckpt / "ema.safetensors"))
    loaded = load_run(root / "run", raw=True)
    teacher = diffusers.SD3Transformer2DModel.from_pretrained(folder / "transformer").state_dict()
    base = {k.replace(".base_layer.", ".").removeprefix("model."): v for k, v in loaded.net.state_dict().items()
            if ".lora_" not in k and k.startswith("model.")}
    assert base.keys() == teacher.keys() and all(torch.equal(base[k], teacher[k]) for k in teacher)
    assert any(v.abs().max() > 0 for k, v in net_file.items() if ".lora_B." in k)  # the adapters trained
    for stem in ("net", "ema", "optim"):  # resumed = straight, bit for bit
        a = load_file(RunDir(root / "run").latest() / f"{stem}.safetensors")
        b = load_file(RunDir(root / "split").latest() / f"{stem}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stem


def test_posthoc_ema_verify_and_sample_work_on_the_adapters(lora_run, tmp_path):
    root = lora_run[2]
    code, text = cli("verify", root / "run")
    assert code == 0, text
    code, text = cli("ema", "reconstruct", root / "run", "--sigma-rel", 0.1, "--out", tmp_path / "ema",
                     "--max-error", 0.99)  # three snapshots: the profile is rough, its error not what is tested
    assert code == 0, text
    posthoc = load_run(tmp_path / "ema")
    assert posthoc.cfg.lora.rank == 4 and posthoc.ema_std == 0.1
    for run in (root / "run", tmp_path / "ema"):
        code, text = cli("sample", "--ckpt", run, "--n", 2, "--steps", 2, "--prompt", "a thick seven",
                         "--out", tmp_path / "s.png")
        assert code == 0 and (tmp_path / "s.png").is_file(), text


def test_export_round_trip_lora_file_and_merge(lora_run, tmp_path):
    from scm.diffusers import SCMPipeline

    _, folder, root = lora_run
    run = root / "run"
    code, text = cli("export", run, tmp_path / "out")
    assert code == 0, text
    info = json.loads((tmp_path / "out" / "lora" / "scm_lora.json").read_text())
    assert info["pipeline_class"] == "StableDiffusion3Pipeline" and info["guidance_input"] is True
    # the SCMPipeline (base and adapters) samples as scm sample does: same seed, same images
    loaded = load_run(run)
    pipe = SCMPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        x, _ = generate(loaded, 2, Sampler(steps=steps), seed=5, prompt="a thin two", guidance=2.0, progress=False)
        y = pipe("a thin two", batch_size=2, num_inference_steps=steps, seed=5, guidance_scale=2.0,
                 output_type="pt").images
        assert (y - ((x + 1) / 2).clamp(0, 1)).abs().max() <= 1e-5, steps  # as tests/test_export.py (clamped)
    # the adapters file loads into the teacher's own pipeline class: its transformer is then the student's network
    teacher_pipe = diffusers.StableDiffusion3Pipeline(
        transformer=diffusers.SD3Transformer2DModel.from_pretrained(folder / "transformer"),
        scheduler=FAMILIES["sd3"][1](), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    teacher_pipe.load_lora_weights(tmp_path / "out" / "lora")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 28, 28, generator=g), torch.full((2,), 300.0)
    text_in, pooled = torch.randn(2, 8, 16, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        ours = loaded.net.model(x, encoder_hidden_states=text_in, pooled_projections=pooled, timestep=t).sample
        theirs = teacher_pipe.transformer(x, encoder_hidden_states=text_in, pooled_projections=pooled,
                                          timestep=t).sample
    _close(theirs, ours, 1e-5)  # scm's exact attention vs diffusers' SDPA: fp32 rounding
    # the merged export: a plain network computing the same F
    code, text = cli("export", run, tmp_path / "merged", "--merge-lora")
    assert code == 0 and not (tmp_path / "merged" / "lora").exists(), text
    merged = SCMPipeline.from_pretrained(tmp_path / "merged")
    assert merged.model.net.cfg.lora.rank == 0
    xt, tt = torch.randn(2, 1, 28, 28, generator=g), torch.tensor([0.4, 1.2])
    cond = {"text": text_in, "text_mask": torch.ones(2, 8, dtype=torch.bool), "text_pooled": pooled}
    with torch.no_grad():
        _close(merged.model.net(xt, tt, guidance=2.0, **cond), loaded.net(xt, tt, guidance=2.0, **cond), 1e-5)
        _close(pipe.model.net(xt, tt, guidance=2.0, **cond), loaded.net(xt, tt, guidance=2.0, **cond), 1e-6)
    code, text = cli("export", root / "run", tmp_path / "again", "--ema", 0.5)  # no such EMA: named, nothing written
    assert code != 0 and "0.5" in text and not (tmp_path / "again").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_for_lora(lora_run, tmp_path, mode):
    """Two ranks of one micro-batch each end with the adapters of one process accumulating both (DDP reduces, FSDP2
    shards, the frozen base is neither; tolerance as tests/test_train.py's: fp32 sums in another order)."""
    from scm.config import make_config
    from scm.train import train

    data, folder, _ = lora_run
    overrides = ["kimg=0.016", "batch=8", *RUN, "sample_every_kimg=None", f"teacher=diffusers:{folder}",
                 "lora.rank=4", "loss.guidance=1,3", "net.guidance_embed=true", "ema.snapshot_kimg=0",
                 f"distributed={mode}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(TESTS / "ddp_worker.py"), str(tmp_path / "two-RANK.safetensors"), "tiny-28-scd", str(data),
           str(tmp_path / "two"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = make_config("tiny-28-scd", None, [*overrides, "grad_accum=2", "distributed=ddp"], data=str(data),
                      out=str(tmp_path / "one"))
    net = train(cfg).net
    one = {k: v for k, v in net.state_dict().items() if k in set(net.trained_keys())}
    two = load_file(tmp_path / "two-0.safetensors")
    assert any(".lora_B." in k for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-6)
