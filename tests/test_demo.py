"""The demo's whole pipeline (data → teacher → sCD and sCT → evaluation → report) with a budget of seconds."""

import json
import typing
from pathlib import Path

from PIL import Image

from scm.app import cli
from scm.app.demo import DemoBudget, run_demo
from scm.config import make_config
from scm.runs import RunDir
from scm.train import train

from conftest import run_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_end_to_end(real_mnist, mnist_classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("SCM_DATA_DIR", real_mnist)
    teacher = tmp_path / "teacher"
    train(make_config("tiny-28-diffusion", None, ["progress=false", "tensorboard=false", "sample_count=4",
                                                   "sample_ode_steps=1", "conditional=true",
                                                   "net.label_dropout=0.1"], data="mnist", out=str(teacher),
                      kimg=0.032, batch=16))
    out = tmp_path / "demo"
    result = run_demo(out, DemoBudget.seconds(), teacher=teacher)
    assert {"report.md", "report.html", "results.json", "losses.png"} <= {p.name for p in out.iterdir()}
    rows = result["rows"]
    assert [(r["model"], r["nfe"]) for r in rows] == [("teacher", 3), ("teacher", 2), ("sCD", 1), ("sCD", 2),
                                                       ("sCT", 1), ("sCT", 2)]
    for r in rows:
        assert (out / r["grid"]).is_file() and r["FD-MNIST"] > 0 and r["seconds_per_image"] > 0
    cal = result["calibration"]
    assert cal["real test digits"] < cal["blurred test digits"] < cal["uniform noise"]
    report = (out / "report.md").read_text()
    assert result["guidance"] == 2.0  # a class-conditional teacher is distilled with classifier-free guidance
    assert json.loads((out / "runs" / "scd" / "config.json").read_text())["loss"]["guidance"] == [2.0, 2.0]
    # students of a class-conditional teacher are class-conditional without being told
    assert json.loads((out / "runs" / "sct" / "config.json").read_text())["conditional"] is True
    assert "| sCD | 2-step consistency, guidance 2 (built in) | 2 |" in report and "![losses](losses.png)" in report
    # 28-px digits are enlarged (nearest neighbour) so that the report's grids can be read: 40 samples → 7 columns
    assert Image.open(out / rows[0]["grid"]).size[0] == 7 * (3 * 28 + 1) + 1
    assert "<table" in (out / "report.html").read_text()
    assert json.loads((out / "results.json").read_text())["metric"] == "FD-MNIST"


def test_the_main_job_leaves_the_checkout_clean():
    """`make demo` writes into runs/ (ignored by git); only `make demo-publish` replaces the committed report."""
    help_text = typing.get_type_hints(cli.demo, include_extras=True)["out"].__metadata__[0].help
    assert "default: runs/demo," in help_text and "runs/demo-text with --text" in help_text
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
    make = (ROOT / "Makefile").read_text()
    demo_recipe = make.split("\ndemo:")[1].split("\n\n")[0]
    assert "--out runs/demo" in demo_recipe and "demo-publish:" in make
    text_recipe = make.split("\ndemo-text:")[1].split("\n\n")[0]
    assert "--out runs/demo-text" in text_recipe and "--text" in text_recipe


def test_text_demo_end_to_end_on_the_committed_text_teacher(real_mnist, mnist_classifier, tmp_path, monkeypatch):
    """`make demo-text` with a budget of seconds: captioned MNIST encoded, the committed text teacher distilled with
    guidance and a VSD phase (from the first step here, so that its critic is built and trained), evaluated on
    held-out prompts (digit accuracy, attribute agreement) and a prompt grid."""
    from PIL import Image

    from scm.app.demo_text import GRID_PROMPTS, TextDemoBudget, run_text_demo

    monkeypatch.setenv("SCM_DATA_DIR", real_mnist)
    out = tmp_path / "demo-text"
    budget = TextDemoBudget.seconds()
    result = run_text_demo(out, budget, teacher=ROOT / "demo" / "text-teacher")
    label = "sCD + VSD"
    assert [(r["model"], r["nfe"]) for r in result["rows"]] == [("teacher", 3), (label, 1), (label, 2)]
    for r in result["rows"]:
        assert 0 <= r["digit_accuracy"] <= 1 and r["digit_count"] == budget.n_eval and (out / r["grid"]).is_file()
    student = json.loads((out / "runs" / "scd" / "config.json").read_text())
    assert student["loss"]["guidance"] == [2.0, 2.0] and student["text"]["encoder"]["kind"] == "builtin"
    assert student["loss"]["vsd_weight"] == budget.vsd_weight > 0 and student["optim"]["critic_lr_scale"] == 5
    assert (RunDir(out / "runs" / "scd").latest() / "critic.safetensors").is_file()
    assert any("critic_loss" in row for row in run_metrics(out / "runs" / "scd"))
    width = Image.open(out / "prompts.png").size[0]  # 2 per prompt, a blank, 2 more, at twice the size
    assert width == (2 * budget.per_prompt + 1) * (2 * 28 + 1) + 1
    assert Image.open(out / "prompts.png").size[1] == len(GRID_PROMPTS) * (2 * 28 + 1) + 1
    report = (out / "report.md").read_text()
    assert "digit accuracy" in report and "sCD + VSD from 0 kimg" in report
