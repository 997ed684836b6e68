"""Every bad input to `scm train` ends with one line naming the problem, exit code != 0, nothing written."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from scm.app.cli import app

from conftest import make_shapes

RUN = ["progress=false", "tensorboard=false", "sample_count=2", "sample_ode_steps=1"]


def train(*args):
    result = CliRunner().invoke(app, ["train", *[str(a) for a in args]])
    return result.exit_code, result.output


def expect_error(args, pattern, out=None):
    code, text = train(*args)
    assert code != 0, text
    lines = [line for line in text.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in text
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{out} was written to"
    return lines[0]


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder(tmp_path):
    images, labels = make_shapes(6)
    root = tmp_path / "imgs"
    for i, (img, y) in enumerate(zip(images[..., 0], labels, strict=True)):
        save_png(root / f"class{y}" / f"{i}.png", img)
    return root


def args_for(data, out, preset="tiny-28-diffusion", *extra):
    return ["--preset", preset, "--data", data, "--out", out, "--kimg", 0.008, "--batch", 4, *RUN, *extra]


def test_missing_data_path(tmp_path):
    out = tmp_path / "run"
    expect_error(args_for(tmp_path / "nope", out), "does not exist", out)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    expect_error(args_for(tmp_path / "empty", out), "no PNG or JPEG images", out)


def test_truncated_image_is_named(folder, tmp_path):
    bad = sorted((folder / "class0").glob("*.png"))[0]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    line = expect_error(args_for(folder, out), "cannot decode image", out)
    assert bad.name in line


def test_mixed_sizes_and_channels(folder, tmp_path):
    save_png(folder / "class1" / "big.png", np.zeros((32, 32), np.uint8))
    out = tmp_path / "run"
    line = expect_error(args_for(folder, out), "same size and channels", out)
    assert "big.png" in line and "32×32" in line
    (folder / "class1" / "big.png").unlink()
    save_png(folder / "class1" / "rgb.png", np.zeros((28, 28, 3), np.uint8))
    line = expect_error(args_for(folder, out), "3 channel(s)", out)
    assert "rgb.png" in line


def test_data_that_does_not_fit_the_preset(folder, tmp_path):
    out = tmp_path / "run"
    expect_error(args_for(folder, out, "tiny-32-diffusion"), "expects 32×32×3", out)


def test_nan_and_corrupt_npz(tmp_path):
    x = np.zeros((4, 28, 28), np.float32)
    x[1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    out = tmp_path / "run"
    expect_error(args_for(tmp_path / "nan.npz", out), "NaN", out)
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    expect_error(args_for(tmp_path / "bad.npz", out), "cannot read the .npz", out)
    np.savez(tmp_path / "nokey.npz", z=np.zeros((4, 28, 28), np.uint8))
    expect_error(args_for(tmp_path / "nokey.npz", out), "expected a key 'x'", out)


def test_unknown_preset_and_key_and_bad_values(shapes_npz, tmp_path):
    out = tmp_path / "run"
    expect_error(["--preset", "tiny-29", "--data", shapes_npz, "--out", out], "unknown preset 'tiny-29'", out)
    expect_error(args_for(shapes_npz, out, "tiny-28-diffusion", "loss.Pmean=1"), "unknown config key 'loss.Pmean'", out)
    expect_error(args_for(shapes_npz, out, "tiny-28-diffusion", "loss.P_std=0"),
                 "loss.P_std=0.0: must be a finite positive number", out)
    expect_error(args_for(shapes_npz, out, "tiny-28-diffusion", "optim.lr=fast"), "optim.lr='fast'", out)
    code, text = train("--preset", "tiny-28-diffusion", "--data", shapes_npz, "--out", out, "--batch", -4)
    assert code != 0 and "--batch -4" in text and not out.exists()
    expect_error(args_for(shapes_npz, out, "tiny-28-diffusion", "nonsense"), "not of the form key=value", out)
    line = expect_error(args_for(shapes_npz, out, "tiny-28-scd"), "sCD needs a teacher", out)
    assert line.startswith("error: --teacher")  # the CLI names its flag; the library does not


@pytest.fixture
def rgb_teacher(tmp_path):
    images, _ = make_shapes(8, res=32, channels=3)
    np.savez(tmp_path / "rgb.npz", x=images)
    run = tmp_path / "rgb-teacher"
    code, text = train(*args_for(tmp_path / "rgb.npz", run, "tiny-32-diffusion"))
    assert code == 0, text
    return run


def test_teacher_that_does_not_match_the_student(shapes_npz, rgb_teacher, tmp_path):
    out = tmp_path / "run"
    line = expect_error(args_for(shapes_npz, out, "tiny-28-scd", "--teacher", rgb_teacher), "teacher", out)
    assert "32×32×3" in line and "28×28×1" in line
    missing = tmp_path / "nothing"
    expect_error(args_for(shapes_npz, out, "tiny-28-scd", "--teacher", missing), "not a run directory", out)


def test_corrupt_teacher_checkpoint(shapes_npz, rgb_teacher, tmp_path):
    images, _ = make_shapes(8, res=32, channels=3)
    np.savez(tmp_path / "rgb2.npz", x=images)
    ema = next((rgb_teacher / "checkpoints").glob("*/ema.safetensors"))
    ema.write_bytes(ema.read_bytes()[:100])
    out = tmp_path / "run"
    line = expect_error(args_for(tmp_path / "rgb2.npz", out, "tiny-32-scd", "--teacher", rgb_teacher), "corrupt", out)
    assert "ema.safetensors" in line


def test_resume_without_checkpoint_and_existing_runs(shapes_npz, tmp_path):
    out = tmp_path / "run"
    code, text = train(*args_for(shapes_npz, out, "tiny-28-diffusion", "--resume"))  # nothing to resume: it starts
    assert code == 0 and "no checkpoint yet: starting from the beginning" in text, text
    shutil.rmtree(out)
    code, text = train(*args_for(shapes_npz, out))
    assert code == 0, text
    before = sorted(p.name for p in out.rglob("*"))
    expect_error(args_for(shapes_npz, out), "already holds a run")
    line = expect_error(args_for(shapes_npz, out, "tiny-28-diffusion", "--resume", "loss.P_mean=0.3"),
                        "different configuration")
    assert "loss" in line
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing was changed
    # a run directory whose checkpoints are gone
    for ckpt in (out / "checkpoints").iterdir():
        if ckpt.is_dir():
            for f in ckpt.iterdir():
                f.unlink()
            ckpt.rmdir()
        else:
            ckpt.unlink()
    # killed before its first checkpoint: the same command with --resume starts it over
    code, text = train(*args_for(shapes_npz, out, "tiny-28-diffusion", "--resume"))
    assert code == 0 and "no checkpoint yet: starting from the beginning" in text, text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # the first attempt's metric lines were dropped, none repeated
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    expect_error(args_for(shapes_npz, other), "not empty")
    expect_error(args_for(shapes_npz, other, "tiny-28-diffusion", "--resume"), "not empty")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_malformed_attention_tuning_table_is_refused_before_training(shapes_npz, tmp_path, monkeypatch):
    from scm.nets import attention_tuning

    table = tmp_path / "tuning.json"
    table.write_text('{"format": 1, "cards": {"X": {"configs": {"fwd/bfloat16/d64x64": [64, 64, 4]}}}}')
    monkeypatch.setenv(attention_tuning.ENV, str(table))
    attention_tuning.reload()
    try:
        out = tmp_path / "run"
        expect_error(["--preset", "tiny-28-sct", "--data", shapes_npz, "--out", out, "--kimg", "0.01", *RUN],
                     "tuning.json: card 'X', key 'fwd/bfloat16/d64x64'", out)
    finally:
        monkeypatch.delenv(attention_tuning.ENV)
        attention_tuning.reload()
