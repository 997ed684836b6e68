"""The training engine: complete run directories, exact resume, DDP/FSDP2 equivalence, NaN handling,
crash safety of checkpoints."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scm.config import make_config
from scm.errors import TrainingStopped
from scm.runs import RunDir
from scm.train import train

from conftest import cli, run_metrics

RUN = ["progress=false", "tensorboard=false", "sample_count=4", "sample_ode_steps=2"]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data_and_teacher(tmp_path_factory):
    """Toy data and a small diffusion teacher run, shared by the tests of this module."""
    from conftest import make_shapes

    root = tmp_path_factory.mktemp("train")
    images, labels = make_shapes(96)
    data = root / "shapes.npz"
    np.savez(data, x=images[..., 0], y=labels)
    teacher = root / "teacher"
    code, out = cli("train", "--preset", "tiny-28-diffusion", "--data", data, "--out", teacher, "--kimg", 0.32,
                    "--batch", 16, *RUN, "log_every=4",
                    "optim.lr_rampup_kimg=0")
    assert code == 0, out
    return data, teacher


def test_diffusion_run_directory_is_complete_and_loss_falls(data_and_teacher):
    _, teacher = data_and_teacher
    run = RunDir(teacher)
    cfg = json.loads(run.config_path.read_text())
    assert cfg["method"] == "diffusion" and cfg["net"]["img_resolution"] == 28
    ckpt = run.latest()
    assert ckpt is not None and {p.name for p in ckpt.iterdir()} == {
        "net.safetensors", "ema.safetensors", "optim.safetensors", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 20 and state["cur_nimg"] == 320
    assert set(load_file(ckpt / "ema.safetensors")) >= {"0.0500/out_gain", "0.1000/out_gain"}
    assert sorted(p.name for p in run.samples_dir.iterdir()) == ["0000000.3kimg-heun-nfe3.png"]
    rows = run_metrics(teacher)
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]
    for key in ("loss", "grad_norm", "lr", "img_per_s", "mse", "weight"):
        assert key in rows[-1]
    # the denoising error must fall from the random initialization
    assert rows[-1]["mse"] < 0.7 * rows[0]["mse"], [r["mse"] for r in rows]  # measured: 2.1 → 0.95


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_consistency_runs_through_the_cli(data_and_teacher, tmp_path, method):
    data, teacher = data_and_teacher
    out = tmp_path / method
    extra = ["--teacher", teacher] if method == "scd" else ["--init", teacher]
    code, text = cli("train", "--preset", "tiny-28", "--method", method, "--data", data, "--out", out, "--kimg",
                     0.16, "--batch", 16, *extra, *RUN, "log_every=2", "loss.warmup_kimg=0.1",
                     "optim.lr=1e-2")
    assert code == 0, text
    assert f"initialized from {teacher}" in text
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["0000000.2kimg-1step.png", "0000000.2kimg-2step.png"]
    rows = run_metrics(out)
    assert {"g_norm", "r", "weight"} <= set(rows[-1]) and rows[-1]["r"] == 1.0
    # The loss value is e^w·mean((F − F⁻ − g)²) − w with F − F⁻ = 0: it must fall as the adaptive weight
    # w_φ(t) rises towards −log mean(g²) (measured for scd: −0.16 → −0.82 over these 10 steps).
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]
    assert rows[-1]["weight"] > rows[0]["weight"] + 0.3


def _all_tensors(run: Path) -> dict:
    ckpt = RunDir(run).latest()
    return {f"{s}/{k}": v for s in ("net", "ema", "optim") for k, v in load_file(ckpt / f"{s}.safetensors").items()}


def test_resume_is_exact(data_and_teacher, tmp_path):
    data, teacher = data_and_teacher
    common = ["--preset", "tiny-28-scd", "--data", data, "--teacher", teacher, "--batch", 8, *RUN,
              "sample_every_kimg=None", "net.dropout=0.2", "loss.warmup_kimg=0.05"]
    code, text = cli("train", "--out", tmp_path / "straight", "--kimg", 0.064, *common)
    assert code == 0, text
    code, text = cli("train", "--out", tmp_path / "split", "--kimg", 0.032, *common)
    assert code == 0, text
    recorded = json.loads((tmp_path / "split" / "config.json").read_text())
    assert recorded["init"] == str(teacher) and "sigma_d" not in recorded["net"]  # resolved: sCD from its teacher
    recorded["init"], recorded["net"]["sigma_d"] = None, 0.5  # as configurations were written before: resumable
    (tmp_path / "split" / "config.json").write_text(json.dumps(recorded))
    code, text = cli("train", "--out", tmp_path / "split", "--kimg", 0.064, "--resume", *common, "t_mid=1.2")
    assert code == 0, text  # a sampling time may change on resume: it does not touch training
    assert "resumed from" in text and json.loads((tmp_path / "split" / "config.json").read_text())["t_mid"] == 1.2
    a, b = _all_tensors(tmp_path / "straight"), _all_tensors(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        assert torch.equal(a[k], b[k]), k  # weights, EMA and optimizer state: bit for bit


def _torchrun(nproc: int, out_file: Path, *args) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(TESTS / "ddp_worker.py"), str(out_file), *[str(a) for a in args]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method,extra", [
    ("diffusion", []), ("sct", ["net.dropout=0.2"]), ("scd", ["net.dropout=0.2", "loss.fused_pass=true"]),
    ("scd", ["distributed=fsdp"]),
])
def test_two_processes_equal_one_process_on_the_same_global_batch(data_and_teacher, tmp_path, method, extra):
    """DDP (gloo, CPU) with one micro-batch per rank must end with the weights of one process that
    accumulates the same two micro-batches: the tangent pass must not break gradient synchronization.
    Tolerance: sums of two fp32 gradients in a different order differ by ~1e-7 of the weights' scale."""
    data, teacher = data_and_teacher
    args = ["tiny-28-" + method, data, None, "kimg=0.032", "batch=16", *RUN, "sample_every_kimg=None",
            *(["teacher=" + str(teacher)] if method == "scd" else []), *extra]
    args[2] = tmp_path / "two"
    _torchrun(2, tmp_path / "two-RANK.safetensors", *args)
    # the reference: this process, one rank, the same two micro-batches accumulated
    preset, data_path, _, *overrides = args
    cfg = make_config(preset, None, [*overrides, "grad_accum=2", "distributed=ddp"], data=str(data_path),
                      out=str(tmp_path / "one"))
    one = train(cfg).net.state_dict()
    two0 = load_file(tmp_path / "two-0.safetensors")
    if "distributed=fsdp" not in extra:  # DDP: every rank holds the same replica
        two1 = load_file(tmp_path / "two-1.safetensors")
        assert all(torch.equal(two0[k], two1[k]) for k in two0)
    for k in one:
        torch.testing.assert_close(two0[k], one[k], atol=2e-6, rtol=1e-6)


class NaNAt:
    """Wrap an objective so that the given calls return a NaN loss (an injected bad batch)."""

    def __init__(self, objective, bad_calls):
        self.objective, self.bad, self.calls = objective, set(bad_calls), 0

    def __call__(self, net, x0, *args, **kw):
        loss, stats = self.objective(net, x0, *args, **kw)
        self.calls += 1
        return (loss * float("nan"), stats) if self.calls in self.bad else (loss, stats)


def _inject_nan(monkeypatch, bad_calls):
    """Hand the training loop an objective whose given calls return a NaN loss."""
    import scm.train.loop

    build = scm.train.loop.build_objective
    monkeypatch.setattr(scm.train.loop, "build_objective", lambda *a, **k: NaNAt(build(*a, **k), bad_calls))


def test_nan_steps_are_skipped_counted_and_stop_the_run(data_and_teacher, tmp_path, monkeypatch):
    data, _ = data_and_teacher
    cfg = make_config("tiny-28-diffusion", None, [*RUN, "sample_every_kimg=None", "log_every=1"], data=str(data),
                      out=str(tmp_path / "nan"), kimg=0.08, batch=8)
    _inject_nan(monkeypatch, {3, 5})
    result = train(cfg)
    assert result.bad_steps == 2 and result.step == 10
    assert all(torch.isfinite(p).all() for p in result.net.parameters())
    rows = run_metrics(tmp_path / "nan")
    assert rows[-1]["bad_steps"] == 2 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)

    cfg = make_config("tiny-28-diffusion", None, [*RUN, "sample_every_kimg=None", "max_bad_steps=3"],
                      data=str(data), out=str(tmp_path / "nan2"), kimg=0.2, batch=8)
    _inject_nan(monkeypatch, {4, 5, 6, 7})
    with pytest.raises(TrainingStopped, match="3 consecutive steps") as info:
        train(cfg)
    assert info.value.reason == "diverged"
    ckpt = RunDir(tmp_path / "nan2").latest()
    weights = load_file(ckpt / "net.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(data_and_teacher, tmp_path):
    data, _ = data_and_teacher
    out = tmp_path / "killed"
    cmd = [sys.executable, str(TESTS / "slow_checkpoint_cli.py"), "1", "train", "--preset", "tiny-28-diffusion",
           "--data", str(data), "--out", str(out), "--kimg", "0.08", "--batch", "8", *RUN, "sample_every_kimg=None",
           "ckpt_every_kimg=0.016"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        # the first checkpoint completes after its pauses (1 s per file); kill during the second one's
        while time.time() < deadline and not (out / "checkpoints" / "latest").exists():
            time.sleep(0.2)
        while time.time() < deadline and not list((out / "checkpoints").glob(".*.tmp-*")):
            time.sleep(0.2)
        assert list((out / "checkpoints").glob(".*.tmp-*")), "no second checkpoint in progress"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = RunDir(out)
    latest = run.latest()
    assert latest is not None and latest.name == "000000002"
    files, state = RunDir.load(latest)
    assert state["step"] == 2 and files["net"] and files["ema"] and files["optim"]
    code, text = cli("train", "--preset", "tiny-28-diffusion", "--data", data, "--out", out, "--kimg", 0.08,
                     "--batch", 8, "--resume", *RUN, "sample_every_kimg=None", "ckpt_every_kimg=0.016")
    assert code == 0, text
    assert "resumed from" in text and "step 2" in text
    assert RunDir(out).latest().name == "000000010"
    assert not list((out / "checkpoints").glob(".*.tmp-*"))  # the partial write was cleaned up


def test_a_run_killed_before_its_first_checkpoint_continues_with_resume(data_and_teacher, tmp_path):
    """SIGKILL (or a power cut) during the first checkpoint write: the same command with --resume starts the run
    over, instead of refusing (no checkpoint) or being refused (a run is there)."""
    data, _ = data_and_teacher
    out = tmp_path / "early"
    args = ["train", "--preset", "tiny-28-diffusion", "--data", str(data), "--out", str(out), "--kimg", "0.048",
            "--batch", "8", *RUN, "sample_every_kimg=None", "ckpt_every_kimg=0.016", "log_every=1"]
    proc = subprocess.Popen([sys.executable, str(TESTS / "slow_checkpoint_cli.py"), "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "checkpoints").glob(".*.tmp-*")):
            time.sleep(0.1)
        assert list((out / "checkpoints").glob(".*.tmp-*")), "no first checkpoint in progress"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert RunDir(out).latest() is None and (out / "config.json").is_file()
    code, text = cli(*args)
    assert code != 0 and "--resume" in text  # the plain command refuses, and says what to do
    code, text = cli(*args, "--resume")
    assert code == 0 and "no checkpoint yet: starting from the beginning" in text, text
    assert RunDir(out).latest().name == "000000006"
    assert [r["step"] for r in run_metrics(out)] == [1, 2, 3, 4, 5, 6]  # the killed attempt's lines were dropped


def test_sigterm_stops_cleanly_with_a_checkpoint(data_and_teacher, tmp_path):
    data, _ = data_and_teacher
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "scm", "train", "--preset", "tiny-28-diffusion", "--data", str(data),
           "--out", str(out), "--kimg", "50", "--batch", "8", *RUN, "sample_every_kimg=None", "log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(run_metrics(out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted" in output and "--resume" in output
    assert RunDir(out).latest() is not None


def test_no_pickle_loading():
    """Checkpoints and user files are read with safetensors/JSON/numpy(allow_pickle=False) only."""
    src = Path(__file__).resolve().parents[1] / "src" / "scm"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):  # only tensors-only loads are allowed
            assert "weights_only=True" in call, (path, call)
        assert "allow_pickle=True" not in text, path


@pytest.mark.parametrize("max_minutes", [None, 2.0])
def test_progress_bar_counts_kimg_or_the_time_budget(max_minutes, capsys):
    """A kimg budget shows kimg done/total; a time budget (max_minutes) shows minutes, with kimg in the postfix."""
    from types import SimpleNamespace

    from scm.train.logger import Logger
    from scm.train.step import StepResult

    cfg = SimpleNamespace(method="sct", max_minutes=max_minutes, progress=True, tensorboard=False, log_every=100)
    log = Logger(SimpleNamespace(path=None), cfg, SimpleNamespace(is_main=True))
    log.start(0, 10_000)
    log.step(40, 2_560, 1e-3, StepResult(True, 0.5, 1.0, {"g_norm": torch.tensor(3.0)}), bad_steps=0)
    log.close()
    err = capsys.readouterr().err
    if max_minutes:
        assert "sct (2-min budget)" in err and "kimg=2.6" in err and "/10.0 kimg" not in err
    else:
        assert "2.6/10.0 kimg" in err
