"""`scm sample` and `scm eval` on a tiny run; their bad inputs."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import cli

RUN = ["progress=false", "tensorboard=false", "sample_count=4", "sample_ode_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import make_shapes

    root = tmp_path_factory.mktemp("sample")
    images, labels = make_shapes(64)
    np.savez(root / "shapes.npz", x=images[..., 0], y=labels)
    teacher, student = root / "teacher", root / "scd"
    for args in (["--preset", "tiny-28-diffusion", "--out", teacher],
                 ["--preset", "tiny-28-scd", "--out", student, "--teacher", teacher]):
        code, text = cli("train", *args, "--data", root / "shapes.npz", "--kimg", 0.064, "--batch", 16, *RUN)
        assert code == 0, text
    return root, teacher, student


def test_sample_formats_and_determinism(runs, tmp_path):
    _, teacher, student = runs
    code, text = cli("sample", "--ckpt", student, "--steps", 2, "--n", 10, "--batch", 4, "--out", tmp_path / "a.npz")
    assert code == 0, text
    assert "img/s" in text and "ms/image" in text
    cli("sample", "--ckpt", student, "--steps", 2, "--n", 10, "--batch", 4, "--out", tmp_path / "b.npz")
    cli("sample", "--ckpt", student, "--steps", 2, "--n", 10, "--batch", 4, "--seed", 1, "--out", tmp_path / "c.npz")
    a, b, c = (np.load(tmp_path / f"{k}.npz")["x"] for k in "abc")
    assert a.shape == (10, 28, 28, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    code, text = cli("sample", "--ckpt", student, "--ts", "1.5,1.0,0.4", "--n", 6, "--out", tmp_path / "grid.png")
    assert code == 0, text
    assert Image.open(tmp_path / "grid.png").size == (3 * 29 + 1, 2 * 29 + 1)
    code, text = cli("sample", "--ckpt", teacher, "--nfe", 5, "--n", 3, "--out", tmp_path / "folder")
    assert code == 0, text
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    code, text = cli("sample", "--ckpt", teacher, "--nfe", 4, "--solver", "euler", "--n", 2,
                     "--out", tmp_path / "e.npz")
    assert code == 0, text


def test_eval_writes_json_and_markdown(runs, tmp_path, monkeypatch):
    root, teacher, student = runs
    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "data"))
    ref = root / "shapes.npz"
    code, text = cli("eval", "--ckpt", student, "--ref", ref, "--steps", 1, "--steps", 2, "--n", 24, "--batch", 12,
                     "--out", tmp_path / "ev")
    assert code == 0, text
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["metric"] == "FD-SHAPES" and [r["nfe"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["FD-SHAPES"] > 0 and row["images_per_second"] > 0 and 0 <= row["confident"] <= 1
    table = (tmp_path / "ev.md").read_text()
    assert "| 1-step consistency | 1 |" in table and "s / sample" in table
    # explicit times: the default 2-step times give the 2-step row's samples (same seed), another t_mid others
    from scm.sampling import consistency_times

    default = ",".join(f"{t!r}" for t in consistency_times(2))
    code, text = cli("eval", "--ckpt", student, "--ref", ref, "--ts", default, "--ts", "1.5,0.8", "--n", 24,
                     "--batch", 12, "--out", tmp_path / "ev-ts")
    assert code == 0, text
    rows = json.loads((tmp_path / "ev-ts.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["2-step consistency, t = 1.565, 1.1", "2-step consistency, t = 1.5, 0.8"]
    assert rows[0]["FD-SHAPES"] == result["rows"][1]["FD-SHAPES"] != rows[1]["FD-SHAPES"]
    # --t-mid: the same samples as the explicit times [t_max, t_mid]; named in the row; the stem keeps its dot
    code, text = cli("eval", "--ckpt", student, "--ref", ref, "--steps", 2, "--t-mid", 0.8, "--n", 24, "--batch", 12,
                     "--out", tmp_path / "ev-t0.8")
    assert code == 0, text
    (row,) = json.loads((tmp_path / "ev-t0.8.json").read_text())["rows"]
    assert row["sampler"] == "2-step consistency, t_mid = 0.8" and row["FD-SHAPES"] != rows[0]["FD-SHAPES"]
    code, text = cli("eval", "--ckpt", student, "--ref", ref, "--ts", f"{consistency_times(1)[0]!r},0.8", "--n", 24,
                     "--batch", 12, "--out", tmp_path / "ev-ts08.json")
    assert code == 0, text
    assert json.loads((tmp_path / "ev-ts08.json").read_text())["rows"][0]["FD-SHAPES"] == row["FD-SHAPES"]
    code, text = cli("eval", "--ckpt", teacher, "--ref", ref, "--nfe", 3, "--n", 8, "--out", tmp_path / "ev2")
    assert code == 0, text
    # --captured: the steps and network as one compiled graph give the eager samples on the CPU, so the same scores
    code, text = cli("eval", "--ckpt", student, "--ref", ref, "--steps", 1, "--steps", 2, "--n", 24, "--batch", 12,
                     "--captured", "--out", tmp_path / "ev-captured")
    assert code == 0, text
    captured = json.loads((tmp_path / "ev-captured.json").read_text())
    assert captured["captured"] is True and result["captured"] is False
    assert [r["FD-SHAPES"] for r in captured["rows"]] == [r["FD-SHAPES"] for r in result["rows"]]
    # the cached reference statistics can be given directly
    stats = next((tmp_path / "data" / "refs").glob("*.npz"))
    code, text = cli("eval", "--ckpt", student, "--ref", stats, "--steps", 1, "--n", 8, "--out", tmp_path / "ev3")
    assert code == 0, text


def test_bad_inputs(runs, tmp_path, monkeypatch):
    root, teacher, student = runs
    monkeypatch.setenv("SCM_DATA_DIR", str(tmp_path / "data"))

    def expect(args, pattern):
        code, text = cli(*args)
        assert code != 0 and pattern in text and "Traceback" not in text, text

    out = ["--out", tmp_path / "x.png"]
    expect(["sample", "--ckpt", tmp_path / "missing", *out], "no such run directory")
    expect(["sample", "--ckpt", root, *out], "not a scm run directory")
    expect(["sample", "--ckpt", student, "--steps", 0, *out], "--steps 0: must be an integer >= 1")
    expect(["sample", "--ckpt", student, "--nfe", 8, *out], "--nfe: this is a scd run")
    expect(["sample", "--ckpt", teacher, "--steps", 2, *out], "--steps: this is a diffusion run")
    expect(["sample", "--ckpt", teacher, "--nfe", 8, *out], "must be odd")
    expect(["sample", "--ckpt", student, "--ts", "1.0,1.2", *out], "strictly decreasing")
    expect(["sample", "--ckpt", student, "--steps", 2, "--t-mid", 1.6, *out],
           "--t-mid 1.6: must lie in (0, t_max = 1.5708)")
    expect(["sample", "--ckpt", student, "--steps", 2, "--t-mid", 1.565, *out], "--t-mid")  # not below t_max
    expect(["sample", "--ckpt", student, "--ts", "1.5,1.0", "--t-mid", 1.0, *out], "either explicit times or t_mid")
    expect(["sample", "--ckpt", teacher, "--nfe", 5, "--t-mid", 1.0, *out], "diffusion run")
    expect(["sample", "--ckpt", student, "--class", 3, *out], "--class 3: this model is unconditional")
    expect(["sample", "--ckpt", student, "--out", tmp_path / "x.jpg"], "--out")
    expect(["eval", "--ckpt", student, "--ref", root / "shapes.npz", "--nfe", 8], "--nfe: this is a scd run")
    expect(["eval", "--ckpt", student, "--ref", root / "nothing.npz"], "does not exist")
    expect(["eval", "--ckpt", student, "--ref", root / "shapes.npz", "--metric", "is"], "--metric 'is'")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip file")
    expect(["eval", "--ckpt", student, "--ref", corrupt, "--n", 4], "cannot read the .npz file")
    expect(["eval", "--ckpt", teacher, "--ref", root / "shapes.npz", "--nfe", 3, "--n", 4, "--guidance", 2],
           "class-conditional")
    # reference statistics for another resolution
    from scm.metrics.quality import RefStats

    RefStats(np.zeros(128), np.eye(128), np.zeros((10, 128)), "classifier:shapes", (3, 32, 32), "elsewhere",
             10).save(tmp_path / "ref32.npz")
    legacy = {"space": "classifier:shapes", "resolution": 32, "channels": 3, "source": "elsewhere", "count": 10}
    np.savez(tmp_path / "old.npz", mu=np.zeros(128), sigma=np.eye(128), sample=np.zeros((10, 128)),
             meta=np.array(json.dumps(legacy)))  # statistics written before shapes were tuples still load
    assert RefStats.load(tmp_path / "old.npz").shape == (3, 32, 32)
    (tmp_path / "data" / "classifiers").mkdir(parents=True, exist_ok=True)
    expect(["eval", "--ckpt", student, "--ref", tmp_path / "ref32.npz", "--steps", 1, "--n", 4], "no cached classifier")
    # a corrupt checkpoint
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(student, broken)
    ema = next((broken / "checkpoints").glob("*/ema.safetensors"))
    ema.write_bytes(b"\x00" * 10)
    expect(["sample", "--ckpt", broken, *out], "corrupt")


def test_arguments_and_outputs_are_checked_before_sampling(tmp_path):
    """A bad class or an output that cannot be written fails at once, before any image is generated."""
    conditional = "demo/teacher"  # the committed class-conditional teacher (10 classes)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    for args, pattern in ((["--class", 42, "--out", tmp_path / "x.png"], "--class 42: this model has classes 0..9"),
                          (["--out", blocker / "sub" / "x.png"], "--out"),
                          (["--guidance", -1, "--out", tmp_path / "y.png"], "--guidance -1.0: must be a scale > 0")):
        code, text = cli("sample", "--ckpt", conditional, "--nfe", 35, "--n", 200, *args)
        assert code == 2 and pattern in text and "img/s" not in text and "Traceback" not in text, text
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_an_image_depends_on_seed_and_index_only(runs, tmp_path, which):
    """EDM2's per-image seeds: the first 8 images of n=24 (batch 10) equal n=8 (batch 3), for both samplers."""
    _, teacher, student = runs
    ckpt, sampler = (student, ["--steps", 2]) if which == "student" else (teacher, ["--nfe", 5])
    code, text = cli("sample", "--ckpt", ckpt, *sampler, "--n", 8, "--batch", 3, "--out", tmp_path / "few.npz")
    assert code == 0, text
    code, text = cli("sample", "--ckpt", ckpt, *sampler, "--n", 24, "--batch", 10, "--out", tmp_path / "many.npz")
    assert code == 0, text
    few, many = np.load(tmp_path / "few.npz")["x"], np.load(tmp_path / "many.npz")["x"]
    assert np.array_equal(few, many[:8])
    assert not np.array_equal(many[:8], many[8:16])  # and different images differ


def test_a_runs_t_mid_is_every_samplers_default(runs):
    """The run's config `t_mid` (the paper's 1.1 unless set) places 2+ steps; a sampler's own t_mid overrides it;
    out-of-range values are refused where they enter (the config, the sampler)."""
    import dataclasses

    from scm.config import make_config
    from scm.errors import ConfigError, SamplerError
    from scm.generate import Sampler
    from scm.runs import load_run
    from scm.sampling import consistency_times

    _, _, student = runs
    run = load_run(student)
    t_max = consistency_times(1)[0]
    assert run.cfg.t_mid == 1.1 and Sampler(steps=2).times(run) == [t_max, 1.1]
    run.cfg = dataclasses.replace(run.cfg, t_mid=1.3)
    assert Sampler(steps=2).times(run) == [t_max, 1.3] == Sampler(steps=2, t_mid=1.3).times(run)
    assert Sampler(steps=4).times(run) == pytest.approx([t_max, 1.3, 1.3 * 2 / 3, 1.3 / 3], rel=1e-12)
    assert Sampler(steps=2).describe(run) == "2-step consistency, t_mid = 1.3"
    assert Sampler(steps=2, t_mid=1.1).describe(run) == "2-step consistency"
    assert Sampler(steps=1).times(run) == [t_max] and Sampler(steps=1).describe(run) == "1-step consistency"
    for bad in (0.0, float("nan"), 1.6, t_max):
        with pytest.raises(ConfigError, match="t_mid"):
            make_config("tiny-28-sct", None, [f"t_mid={bad}"]).validate()
    with pytest.raises(SamplerError, match="t_mid"):
        Sampler(steps=2, t_mid=-1.0)
