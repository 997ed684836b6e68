"""Verify what is read (fault injection): damaged, truncated, swapped or non-finite checkpoint files, hostile
safetensors headers and `latest` pointers, configurations that do not fit their weights, files written before
digests were recorded, and `--resume` after each of these or after a kill in the first second."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from scm.errors import CheckpointError, ConfigError, UnverifiedWarning
from scm.integrity import DIGEST_KEY, check_finite, read_header, read_tensors, write_tensors
from scm.runs import FILES_KEY, RunDir, load_run

from conftest import cli

TRAIN = ["--kimg", "0.012", "--batch", "4", "progress=false", "tensorboard=false", "sample_every_kimg=0",
         "ckpt_every_kimg=0.004", "keep_ckpts=3", "ema.snapshot_kimg=0.004"]


def flip_bit(path, offset: int) -> None:
    """Flip the lowest bit of the byte at `offset` (negative: from the end), in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny diffusion run with three checkpoints (steps 1, 2, 3) and EMA snapshots."""
    import numpy as np

    from conftest import make_shapes

    root = tmp_path_factory.mktemp("integrity")
    images, labels = make_shapes(32)
    np.savez(root / "shapes.npz", x=images[..., 0], y=labels)
    code, text = cli("train", "--preset", "tiny-28-diffusion", "--data", root / "shapes.npz", "--out", root / "run",
                     *TRAIN)
    assert code == 0, text
    assert [p.name for p in RunDir(root / "run").checkpoints()] == ["000000001", "000000002", "000000003"]
    return root


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def newest(run, name="ema.safetensors"):
    return RunDir(run).latest() / name


# -- files -----------------------------------------------------------------------------------------------------------
def test_digest_round_trip_and_every_byte_matters(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    digest = write_tensors(tensors, path, {"note": "x"})
    assert read_header(path).digest == digest and digest.startswith("sha256:")
    back = read_tensors(path, record=digest)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert load_file(str(path))["a"].equal(tensors["a"])  # still a plain safetensors file
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    for offset in (-1, 8 + n + 3, 8 + n // 2):  # the data's last byte, its first tensor, the header's JSON
        damaged = tmp_path / f"d{offset}.safetensors"
        shutil.copy(path, damaged)
        flip_bit(damaged, offset)
        with pytest.raises(CheckpointError, match=str(damaged)):
            read_tensors(damaged)
    with pytest.raises(CheckpointError, match="not the file its checkpoint recorded"):
        read_tensors(path, record="sha256:" + "0" * 64)


def test_truncated_and_hostile_headers_refused_before_mapping(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensors({"w": torch.randn(64)}, path)
    blob = path.read_bytes()
    cases = {"short.safetensors": blob[:5], "cut.safetensors": blob[:-7],
             "huge-header.safetensors": struct.pack("<Q", 2**62) + blob[8:],
             "not-json.safetensors": blob[:8] + b"\xff" * (len(blob) - 8)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            read_tensors(tmp_path / name)
    # a sparse file of 4 TiB whose header claims one tensor filling it: consistent with the file's real size, so only
    # the network's shapes (or, knowing nothing, the machine's memory) can refuse it, before a byte is mapped or read
    header = json.dumps({"w": {"dtype": "U8", "shape": [2**42], "data_offsets": [0, 2**42]}}).encode()
    header += b" " * (-len(header) % 8)
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**42)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"do not fit the run's network.*w is \[4398046511104\]"):
        read_tensors(sparse, expect={"w": (64,)})
    with pytest.raises(CheckpointError, match="GiB of memory"):
        read_tensors(sparse)
    assert time.monotonic() - start < 5  # nothing was read


def test_non_finite_values_refused(tmp_path):
    tensors = {"w": torch.randn(8), "v": torch.ones(2)}
    tensors["w"][3] = float("nan")
    write_tensors(tensors, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="w holds 1 non-finite"):
        read_tensors(tmp_path / "nan.safetensors")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # every float dtype, every kind
        big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # finite values whose sum overflows their dtype
        check_finite({"big": big}, "x")
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(CheckpointError, match="big holds 1 non-finite"):
                check_finite({"big": torch.cat([big, torch.tensor([bad], dtype=dtype)])}, "x")
    save_file({"w": torch.tensor([1.0, float("inf")])}, str(tmp_path / "old.safetensors"))  # no digest
    with pytest.warns(UnverifiedWarning), pytest.raises(CheckpointError, match="non-finite"):
        read_tensors(tmp_path / "old.safetensors")


# -- run directories -------------------------------------------------------------------------------------------------
def test_checkpoints_record_their_files(run):
    for ckpt in RunDir(run).checkpoints():
        state = json.loads((ckpt / "state.json").read_text())
        assert sorted(state[FILES_KEY]) == ["ema.safetensors", "net.safetensors", "optim.safetensors"]
        for name, digest in state[FILES_KEY].items():
            assert read_header(ckpt / name).digest == digest
    for snap in (run / "ema-snapshots").iterdir():
        assert DIGEST_KEY in read_header(snap).metadata


def test_damaged_newest_checkpoint_is_named_with_the_newest_intact(run):
    flip_bit(newest(run), -10)
    with pytest.raises(CheckpointError) as e:
        load_run(run)
    assert "000000003/ema.safetensors: damaged" in str(e.value)
    assert "the newest intact checkpoint is" in str(e.value) and str(e.value).endswith("000000002")
    loaded = load_run(run / "checkpoints" / "000000002")  # a checkpoint can be named directly
    assert loaded.step == 2
    code, text = cli("sample", "--ckpt", run, "--out", run.parent / "x.png", "--n", "2", "--nfe", "3")
    assert code == 2 and "damaged" in text and "000000002" in text and "Traceback" not in text, text
    assert not (run.parent / "x.png").exists()


def test_swapped_and_missing_files(run):
    ckpts = RunDir(run).checkpoints()
    shutil.copy(ckpts[0] / "ema.safetensors", ckpts[-1] / "ema.safetensors")  # a valid file, from another checkpoint
    with pytest.raises(CheckpointError, match="not the file its checkpoint recorded"):
        load_run(run)
    (ckpts[-1] / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: file missing"):
        load_run(run)


def rewrite(ckpt, stem, change) -> None:
    """Rewrite a checkpoint file consistently (its digest recorded in state.json): what a writer without the finite
    check (or a diverged run of an older scm) could have left."""
    tensors = load_file(str(ckpt / f"{stem}.safetensors"))
    change(tensors)
    state = json.loads((ckpt / "state.json").read_text())
    state[FILES_KEY][f"{stem}.safetensors"] = write_tensors(tensors, ckpt / f"{stem}.safetensors")
    (ckpt / "state.json").write_text(json.dumps(state))


def poison(tensors):
    first = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() >= 1024)
    tensors[first].view(-1)[:1024] = float("nan")  # 4 KiB of NaN


def test_nan_weights_refused_by_every_reader(run):
    for stem in ("ema", "net"):
        rewrite(RunDir(run).latest(), stem, poison)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_run(run)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_run(run, raw=True)
    code, text = cli("export", run, run.parent / "exported")
    assert code == 2 and "non-finite" in text and not (run.parent / "exported").exists(), text
    with pytest.raises(CheckpointError, match="non-finite"):
        RunDir(run).save(9, {"net": {"w": torch.tensor([float("nan")])}}, {"step": 9}, keep=3)
    assert RunDir(run).latest().name == "000000003"  # the refused checkpoint replaced nothing


def test_resume_falls_back_to_the_newest_intact_checkpoint(run, trained):
    rewrite(RunDir(run).latest(), "net", poison)  # NaN weights, consistently recorded
    flip_bit(RunDir(run).checkpoints()[1] / "optim.safetensors", -5)  # and a flipped bit in the one before
    code, text = cli("train", "--preset", "tiny-28-diffusion", "--data", trained / "shapes.npz", "--out", run,
                     *TRAIN, "--resume")
    assert code == 0, text
    assert "skipped checkpoint" in text and "000000003" in text and "000000002" in text
    assert "resumed from" in text and "000000001" in text, text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "000000001", "000000002", "000000002.damaged", "000000003", "000000003.damaged", "latest"]
    assert "non-finite" in (run / "checkpoints" / "000000003.damaged" / "why.txt").read_text()
    for ckpt in RunDir(run).checkpoints():  # written again, intact, equal to the straight run's
        files, _ = RunDir.load(ckpt)
        straight, _ = RunDir.load(trained / "run" / "checkpoints" / ckpt.name)
        assert all(torch.equal(files["ema"][k], straight["ema"][k]) for k in straight["ema"])


def test_latest_cannot_lead_outside_the_run(run, tmp_path):
    pointer = run / "checkpoints" / "latest"
    for hostile in ("../../elsewhere", "/etc", "000000003/../../.."):
        pointer.write_text(hostile + "\n")
        with pytest.raises(CheckpointError, match="not a checkpoint of this run"):
            load_run(run)
    pointer.unlink()
    pointer.symlink_to(tmp_path / "outside")
    with pytest.raises(CheckpointError, match="not a plain file"):
        load_run(run)
    pointer.unlink()
    outside = tmp_path / "outside-ckpt"
    shutil.move(run / "checkpoints" / "000000003", outside)
    (run / "checkpoints" / "000000003").symlink_to(outside)
    pointer.write_text("000000003\n")
    with pytest.raises(CheckpointError, match="leads outside the run directory"):
        load_run(run)
    code, text = cli("sample", "--ckpt", run, "--out", tmp_path / "x.png", "--n", "2", "--nfe", "3")
    assert code == 2 and "leads outside" in text, text


def test_config_that_does_not_fit_its_weights(run, trained, tmp_path):
    cfg = json.loads((run / "config.json").read_text())
    cfg["net"]["model_channels"] = cfg["net"]["model_channels"] * 2
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not fit the run's network.*differing tensors") as e:
        load_run(run)
    assert "in the file but" in str(e.value)
    code, text = cli("sample", "--ckpt", run, "--out", tmp_path / "x.png", "--n", "2", "--nfe", "3")
    assert code == 2 and "differing tensors" in text and "Traceback" not in text, text
    code, text = cli("train", "--preset", "tiny-28-diffusion", "--data", trained / "shapes.npz", "--out",
                     tmp_path / "student", "--init", run, *TRAIN)
    assert code == 2 and "differing tensors" in text, text


def test_runs_without_digests_load_with_one_warning(run, trained):
    for ckpt in RunDir(run).checkpoints():  # as scm wrote them before digests were recorded
        state = json.loads((ckpt / "state.json").read_text())
        del state[FILES_KEY]
        (ckpt / "state.json").write_text(json.dumps(state))
        for f in ckpt.glob("*.safetensors"):
            save_file(load_file(str(f)), str(f))
    with pytest.warns(UnverifiedWarning, match="loaded unverified"):
        load_run(run)
    code, text = cli("sample", "--ckpt", run, "--out", run.parent / "x.png", "--n", "2", "--nfe", "3")
    assert code == 0, text
    assert [line for line in text.splitlines() if line.startswith("warning:")] == [
        f"warning: {newest(run)}: written without a content digest (before scm verified what it reads): "
        "loaded unverified"]
    for snap in (run / "ema-snapshots").iterdir():
        save_file(load_file(str(snap)), str(snap), metadata={"scm_ema_snapshot": read_header(snap).metadata[
            "scm_ema_snapshot"]})
    code, text = cli("ema", "reconstruct", run, "--sigma-rel", "0.08", "--out", run.parent / "rec")
    assert code == 0 and text.count("loaded unverified") == 1 and "3 files written without" in text, text
    code, text = cli("train", "--preset", "tiny-28-diffusion", "--data", trained / "shapes.npz", "--out", run,
                     *TRAIN, "--kimg", "0.016", "--resume")  # one line for the checkpoint's three files
    assert code == 0 and text.count("loaded unverified") == 1 and "3 files written without" in text, text


def test_scm_verify_checks_a_whole_run_and_records_digests_of_old_ones(run):
    code, text = cli("verify", run)
    assert code == 0 and text.count("intact") == 9 + 3 + 1 and "12 intact" in text, text  # 3 checkpoints, 3 snapshots
    for ckpt in RunDir(run).checkpoints()[:2]:  # two checkpoints as written before digests were recorded
        state = json.loads((ckpt / "state.json").read_text())
        del state[FILES_KEY]
        (ckpt / "state.json").write_text(json.dumps(state))
        for f in ckpt.glob("*.safetensors"):
            save_file(load_file(str(f)), str(f))
    code, text = cli("verify", run)
    assert code == 0 and "6 unverified" in text, text
    flip_bit(run / "checkpoints" / "000000001" / "net.safetensors", -2)  # undetectable without a digest …
    tensors = load_file(str(run / "checkpoints" / "000000002" / "ema.safetensors"))
    next(iter(tensors.values())).view(-1)[0] = float("inf")  # … unlike a non-finite value
    save_file(tensors, str(run / "checkpoints" / "000000002" / "ema.safetensors"))
    code, text = cli("verify", run, "--record-digests")
    assert code == 1 and "1 damaged" in text and "000000002/ema.safetensors: " in text and "non-finite" in text, text
    assert "5 recorded" in text, text
    assert FILES_KEY in json.loads((run / "checkpoints" / "000000001" / "state.json").read_text())
    assert FILES_KEY not in json.loads((run / "checkpoints" / "000000002" / "state.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedWarning)
        assert load_run(run / "checkpoints" / "000000001", raw=True).step == 1  # verified from now on


@pytest.mark.parametrize("teacher", ["demo/teacher", "demo/text-teacher"])
def test_committed_demo_teachers_are_verified(teacher):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedWarning)
        assert load_run(teacher).cfg.method == "diffusion"


def test_scd_refuses_a_consistency_teacher(trained, tmp_path):
    code, text = cli("train", "--preset", "tiny-28-sct", "--data", trained / "shapes.npz", "--out", tmp_path / "sct",
                     "--kimg", "0.004", "--batch", "4", "progress=false", "sample_every_kimg=0")
    assert code == 0, text
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", trained / "shapes.npz", "--out", tmp_path / "scd",
                     "--teacher", tmp_path / "sct", "--kimg", "0.004", "--batch", "4")
    assert code == 2 and "an sct run (a consistency model)" in text and "--teacher" in text, text
    assert not (tmp_path / "scd").exists()
    with pytest.raises(ConfigError):
        from scm.config import make_config
        from scm.data import load_dataset
        from scm.train.resolve import resolve

        cfg = make_config("tiny-28-scd", None, [], data=str(trained / "shapes.npz"), out=str(tmp_path / "scd"),
                          teacher=str(tmp_path / "sct"))
        resolve(cfg, load_dataset(cfg.data))


@pytest.mark.parametrize("delay", [0.3, 2.5, None])
def test_resume_works_in_a_requeue_script_whenever_the_first_attempt_died(trained, tmp_path, delay):
    """The same command with --resume, after a SIGKILL before the folder exists (0.3 s: still importing), while the
    run is being set up (2.5 s), or after its first checkpoint (None: killed once one exists)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "scm", "train", "--preset", "tiny-28-diffusion", "--data",
               str(trained / "shapes.npz"), "--out", str(out), *TRAIN, "--resume"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while delay is None and not RunDir(out).checkpoints() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay or 0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in RunDir(out).checkpoints()] == ["000000001", "000000002", "000000003"]
    files, _ = RunDir.load(RunDir(out).latest())
    straight, _ = RunDir.load(trained / "run" / "checkpoints" / "000000003")
    assert all(torch.equal(files["net"][k], straight["net"][k]) for k in straight["net"])


def test_inception_weights_of_another_network_are_a_named_error(tmp_path):
    from scm.errors import InceptionError
    from scm.metrics.inception import FIDInceptionV3, load_inception

    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    name = next(k for k, v in state.items() if v.ndim == 4)
    state[name] = torch.zeros(1, *state[name].shape[1:])
    write_tensors(state, tmp_path / "inception.safetensors")
    with pytest.raises(InceptionError, match=f"not the FID Inception weights.*{name} is \\[1, "):
        load_inception(tmp_path / "inception.safetensors")
    flip_bit(tmp_path / "inception.safetensors", -1)
    with pytest.raises(InceptionError, match="damaged"):
        load_inception(tmp_path / "inception.safetensors")


def test_cached_classifiers_are_verified_adopted_and_retrained_when_damaged(tmp_path):
    from scm.errors import DataError
    from scm.metrics.classifier import Classifier, get_classifier

    folder = tmp_path / "classifiers"
    folder.mkdir()
    model = Classifier(1, 10)
    save_file(model.state_dict(), str(folder / "toy.safetensors"))  # cached by an scm before digests
    (folder / "toy.json").write_text(json.dumps({"channels": 1, "num_classes": 10}))
    with pytest.warns(UnverifiedWarning):
        get_classifier("toy", root=tmp_path)
    assert read_header(folder / "toy.safetensors").digest is not None  # recorded: the next read is verified
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedWarning)
        loaded, _ = get_classifier("toy", root=tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    flip_bit(folder / "toy.safetensors", -3)
    with pytest.raises(DataError, match=r"damaged cached classifier.*delete it"):
        get_classifier("toy", root=tmp_path)  # (with its data set given, it would be trained again)
