"""The transformer through the whole tool: presets, config files, training (diffusion, sCT, sCD), resume,
students of another architecture, sampling from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scm.config import from_dict, make_config, to_dict
from scm.errors import ConfigError
from scm.nets import DiTConfig, UNetConfig
from scm.runs import RunDir, load_run
from scm.train import train

from conftest import cli, run_metrics

RUN = ["progress=false", "tensorboard=false", "sample_count=4", "sample_ode_steps=2"]
TESTS = Path(__file__).resolve().parent
SMALL = ["net.hidden_size=48", "net.depth=2", "net.num_heads=2"]  # dit-tiny's shape, less of it: seconds per run


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    from conftest import make_shapes

    root = tmp_path_factory.mktemp("dit")
    images, labels = make_shapes(96)
    data = root / "shapes.npz"
    np.savez(data, x=images[..., 0], y=labels)
    teacher = root / "teacher"
    code, out = cli("train", "--preset", "dit-tiny-28-diffusion", "--data", data, "--out", teacher, "--kimg", 0.32,
                    "--batch", 16, *RUN, *SMALL, "log_every=4", "optim.lr_rampup_kimg=0")
    assert code == 0, out
    return data, teacher


def test_presets_and_config_files_know_the_transformer():
    for family in ("dit-tiny-28", "dit-tiny-32"):
        for method in ("diffusion", "sct", "scd"):
            cfg = make_config(family, method, teacher="x" if method == "scd" else None)
            assert isinstance(cfg.net, DiTConfig) and cfg.net_preset == "dit-tiny"
            assert cfg.net.img_resolution == int(family[-2:])
            assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg  # the run's config.json round trip
    code, out = cli("presets")
    assert code == 0 and "dit-tiny-28-scd" in out and "dit-tiny-32-diffusion" in out
    # a network field the transformer does not have is named, with the fields it does have
    with pytest.raises(ConfigError, match=r"net\.dropout_max_res"):
        make_config("dit-tiny-28-sct", overrides=["net.dropout_max_res=16"])
    # a config file whose network does not match its net_preset is refused
    bad = to_dict(make_config("dit-tiny-28-diffusion"))
    bad["net_preset"] = "tiny"
    with pytest.raises(ConfigError):
        from_dict(bad)


def test_diffusion_teacher_trains(dit_teacher):
    _, teacher = dit_teacher
    cfg = json.loads(RunDir(teacher).config_path.read_text())
    assert cfg["net_preset"] == "dit-tiny" and cfg["net"]["patch_size"] == 4
    rows = run_metrics(teacher)
    assert rows[-1]["mse"] < 0.8 * rows[0]["mse"], [r["mse"] for r in rows]
    run = load_run(teacher)
    assert type(run.net).__name__ == "DiT" and run.step == 20


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_consistency_students_of_a_transformer(dit_teacher, tmp_path, method):
    data, teacher = dit_teacher
    out = tmp_path / method
    extra = ["--teacher", teacher] if method == "scd" else ["--init", teacher]
    code, text = cli("train", "--preset", "dit-tiny-28", "--method", method, "--data", data, "--out", out,
                     "--kimg", 0.16, "--batch", 16, *extra, *RUN, "log_every=2", "loss.warmup_kimg=0.1",
                     "net.dropout=0.1")
    assert code == 0, text
    assert f"initialized from {teacher}" in text
    rows = run_metrics(out)
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]  # the adaptive weight alone lowers it
    assert json.loads(RunDir(out).config_path.read_text())["net"]["dropout"] == 0.1
    code, text = cli("sample", "--ckpt", out, "--n", 4, "--steps", 2, "--out", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").is_file(), text


def test_resume_is_exact_for_the_transformer(dit_teacher, tmp_path):
    data, teacher = dit_teacher
    common = ["--preset", "dit-tiny-28-scd", "--data", data, "--teacher", teacher, "--batch", 8, *RUN,
              "sample_every_kimg=None", "net.dropout=0.2", "net.label_dropout=0.0", "loss.warmup_kimg=0.05"]
    assert cli("train", "--out", tmp_path / "straight", "--kimg", 0.048, *common)[0] == 0
    assert cli("train", "--out", tmp_path / "split", "--kimg", 0.024, *common)[0] == 0
    code, text = cli("train", "--out", tmp_path / "split", "--kimg", 0.048, "--resume", *common)
    assert code == 0 and "resumed from" in text, text
    for stem in ("net", "ema", "optim"):
        a = load_file(RunDir(tmp_path / "straight").latest() / f"{stem}.safetensors")
        b = load_file(RunDir(tmp_path / "split").latest() / f"{stem}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}/{k}"


def test_scd_with_vsd_trains_its_critic_and_resumes_exactly(dit_teacher, tmp_path):
    """sCD + VSD (§6): the critic starts as the teacher (in the student's architecture), trains alongside the
    student from loss.vsd_start_kimg on (idle before), and is checkpointed with its optimizer: a run resumed inside
    the phase ends with the weights, optimizer states and critic of a straight one, bit for bit."""
    data, teacher = dit_teacher
    common = ["--preset", "dit-tiny-28-scd", "--data", data, "--teacher", teacher, "--batch", 8, *RUN,
              "sample_every_kimg=None", "log_every=1", "loss.warmup_kimg=0.01", "loss.vsd_weight=0.5",
              "loss.vsd_start_kimg=0.016", "net.dropout=0.1"]
    code, text = cli("train", "--out", tmp_path / "straight", "--kimg", 0.048, *common)
    assert code == 0 and "a VSD critic initialized as the teacher" in text, text
    rows = [r for r in run_metrics(tmp_path / "straight") if "critic_loss" in r]  # from 0.016 kimg on: 4 of 6 steps
    assert len(rows) == 4 and all(np.isfinite([r["critic_loss"], r["vsd_norm"], r["critic_grad_norm"]]).all()
                                  for r in rows), rows
    ckpt = RunDir(tmp_path / "straight").latest()
    critic, teacher_net = load_file(ckpt / "critic.safetensors"), load_run(teacher).net.state_dict()
    assert set(teacher_net) == set(critic)
    assert any(not torch.equal(critic[k], teacher_net[k]) for k in teacher_net)  # it was trained
    assert cli("train", "--out", tmp_path / "split", "--kimg", 0.024, *common)[0] == 0
    code, text = cli("train", "--out", tmp_path / "split", "--kimg", 0.048, "--resume", *common)
    assert code == 0 and "resumed from" in text, text
    for stem in ("net", "ema", "optim", "critic", "critic_optim"):
        a, b = (load_file(RunDir(tmp_path / r).latest() / f"{stem}.safetensors") for r in ("straight", "split"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}/{k}"
    code, text = cli("sample", "--ckpt", tmp_path / "straight", "--n", 2, "--steps", 1, "--out", tmp_path / "s.png")
    assert code == 0, text


@pytest.mark.parametrize("extra", [["net.dropout=0.1"], ["distributed=fsdp"]])
def test_scd_with_vsd_on_two_processes_equals_one_process(dit_teacher, tmp_path, extra):
    """sCD + VSD under torchrun: the student is called twice with gradients before one backward pass (the sCD pass,
    fused with the tangent under DDP, separate under FSDP2; then the one-step samples) and the critic once, and
    gradients are still all-reduced once per network. Two ranks of one micro-batch, stopped inside the VSD phase
    and resumed, end with the student and the critic of one process accumulating both micro-batches (tolerance as
    for the other two-process tests: fp32 sums of two gradients in another order)."""
    data, teacher = dit_teacher
    overrides = ["batch=16", *RUN, "sample_every_kimg=None", "log_every=1", f"teacher={teacher}",
                 "loss.warmup_kimg=0.01", "loss.vsd_weight=0.5", "loss.vsd_start_kimg=0.016", *extra]
    for kimg, resume in ((0.032, "0"), (0.048, "1")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(TESTS / "ddp_worker.py"), str(tmp_path / "two-RANK.safetensors"), "dit-tiny-28-scd", str(data),
               str(tmp_path / "two"), f"kimg={kimg}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(
            os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS), SCM_WORKER_RESUME=resume))
        assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = make_config("dit-tiny-28-scd", None, ["kimg=0.048", *overrides, "grad_accum=2", "distributed=ddp"],
                      data=str(data), out=str(tmp_path / "one"))
    one = train(cfg).net.state_dict()
    two = load_file(tmp_path / "two-0.safetensors")
    critics = [load_file(RunDir(tmp_path / r).latest() / "critic.safetensors") for r in ("one", "two")]
    initial = load_run(teacher).net.state_dict()
    assert one.keys() == two.keys() and critics[0].keys() == critics[1].keys() == initial.keys()
    assert any(not torch.equal(critics[0][k], initial[k]) for k in initial)  # the critic was trained
    for a, b in ((one, two), (critics[0], critics[1])):
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-6)
    assert any("critic_loss" in row for row in run_metrics(tmp_path / "two"))


def test_vsd_is_refused_where_it_cannot_run(dit_teacher, tmp_path):
    """Each refusal names loss.vsd_weight and why, before any training: sCT has no teacher, and a teacher of another
    architecture cannot be the critic's starting point."""
    data, teacher = dit_teacher
    code, text = cli("train", "--preset", "dit-tiny-28-sct", "--data", data, "--init", teacher, "--out",
                     tmp_path / "sct", "--kimg", 0.016, "--batch", 8, *RUN, "loss.vsd_weight=1")
    assert code == 2 and "loss.vsd_weight" in text and "sCD only" in text, text
    unet_teacher = tmp_path / "unet"
    assert cli("train", "--preset", "tiny-28-diffusion", "--data", data, "--out", unet_teacher, "--kimg", 0.016,
               "--batch", 16, *RUN, "sample_every_kimg=None", "net.model_channels=8")[0] == 0
    code, text = cli("train", "--preset", "dit-tiny-28-scd", "--data", data, "--out", tmp_path / "cross",
                     "--teacher", unet_teacher, "--kimg", 0.016, "--batch", 8, *RUN, *SMALL, "loss.vsd_weight=1")
    assert code == 2 and "loss.vsd_weight" in text and "does not fit the student's" in text, text
    assert not RunDir(tmp_path / "cross").latest()


def test_students_across_architectures(dit_teacher, tmp_path):
    """sCD of a U-Net teacher into a transformer starts fresh (it cannot start from the teacher's weights);
    an explicit init of another architecture is an error that names it."""
    data, teacher = dit_teacher
    unet_teacher = tmp_path / "unet"
    assert cli("train", "--preset", "tiny-28-diffusion", "--data", data, "--out", unet_teacher, "--kimg", 0.016,
               "--batch", 16, *RUN, "sample_every_kimg=None", "net.model_channels=8")[0] == 0
    code, text = cli("train", "--preset", "dit-tiny-28-scd", "--data", data, "--out", tmp_path / "cross",
                     "--teacher", unet_teacher, "--kimg", 0.016, "--batch", 16, *RUN, *SMALL, "sample_every_kimg=None")
    assert code == 0, text
    assert "fresh initialization (the teacher is a UNet, this preset's network a DiT)" in text
    saved = from_dict(json.loads(RunDir(tmp_path / "cross").config_path.read_text()))
    assert isinstance(saved.net, DiTConfig) and saved.net_preset == "dit-tiny"

    code, text = cli("train", "--preset", "tiny-28-sct", "--data", data, "--out", tmp_path / "bad",
                     "--init", teacher, "--kimg", 0.016, "--batch", 16, *RUN)
    assert code == 2 and "DiT" in text and "init" in text, text
    assert isinstance(make_config("tiny-28-sct").net, UNetConfig)


@pytest.mark.parametrize("extra", [["net.dropout=0.2", "loss.fused_pass=true"], ["distributed=fsdp"]])
def test_two_processes_equal_one_process_for_the_transformer(dit_teacher, tmp_path, extra):
    """DDP (with the fused pass and dropout) and FSDP2 on the transformer: two ranks of one micro-batch end
    with the weights of one process accumulating both (as tests/test_train.py checks for the U-Net; same
    tolerance: fp32 sums of two gradients in another order)."""
    data, teacher = dit_teacher
    overrides = ["kimg=0.032", "batch=16", *RUN, "sample_every_kimg=None", f"init={teacher}",
                 "loss.warmup_kimg=0.01", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(TESTS / "ddp_worker.py"), str(tmp_path / "two-RANK.safetensors"), "dit-tiny-28-sct", str(data),
           str(tmp_path / "two"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = make_config("dit-tiny-28-sct", None, [*overrides, "grad_accum=2", "distributed=ddp"], data=str(data),
                      out=str(tmp_path / "one"))
    one = train(cfg).net.state_dict()
    two = load_file(tmp_path / "two-0.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-6)


def test_scm_train_under_torchrun_ends_cleanly(dit_teacher, tmp_path):
    """`scm train` itself under torchrun with FSDP2: both ranks exit 0 (the command drops the model before
    `shutdown`, which frees the process group before interpreter exit), rank 0 alone reports, one checkpoint."""
    data, teacher = dit_teacher
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "scm", "train",
           "--preset", "dit-tiny-28-sct", "--data", str(data), "--out", str(tmp_path / "run"), "--init", str(teacher),
           "--kimg", "0.032", "--batch", "16", *RUN, "sample_every_kimg=None", "distributed=fsdp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done: ") == 1 and "2 process(es)" in proc.stderr
    assert [p.name for p in RunDir(tmp_path / "run").checkpoints()] == ["000000002"]
