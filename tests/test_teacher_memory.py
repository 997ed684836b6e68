"""The sCD teacher held with less memory (`teacher_dtype`, `teacher_offload`: scm.teachers.HeldTeacher) and sharded
with FSDP2 like the student (scm.train.distributed.shard_evaluated)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scm.config import make_config
from scm.errors import ConfigError
from scm.teachers import HeldTeacher

from conftest import cli

diffusers = pytest.importorskip("diffusers")

from test_diffusers_t2i import CASES, SD, _close, _inputs, _model, _prompts  # noqa: E402
from test_diffusers_t2i_train import FAMILIES, _folder  # noqa: E402

from scm.diffusers import from_diffusers  # noqa: E402

TESTS = Path(__file__).parent
RUN = ["progress=false", "tensorboard=false", "sample_count=2", "sample_every_kimg=None"]


@pytest.mark.parametrize(("dtype", "rel"), [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_a_teacher_held_in_half_precision_is_the_teacher_to_its_rounding(dtype, rel):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per operation), fp16 11 (2.4e-4); through the
    two blocks of the tiny SD3 network the measured error is a few times that, so 3e-2 and 4e-3 of max |F| bound
    it while a wrong conversion (a lost scale, a wrong dtype on the time) is of order 1."""
    model, scheduler = _model("sd3"), CASES["sd3"][1]()
    cond, (x, t) = _prompts("sd3"), _inputs("sd3")
    with torch.no_grad():
        ref = from_diffusers(model, scheduler, sigma_d=SD)(x, t, **cond)
    held = HeldTeacher(from_diffusers(model, scheduler, sigma_d=SD), model, "cpu", dtype)
    assert all(p.dtype == dtype and not p.requires_grad for p in model.parameters())
    F = held(x, t, **cond)
    assert F.dtype == torch.float32
    _close(F, ref, rel)


def test_an_offloaded_teacher_is_on_the_device_only_during_its_calls():
    """The offload mechanics without a GPU: the 'device' is PyTorch's meta device (no memory, shapes only); inside
    the call the weights are there, before and after they are the same host tensors as at the start."""
    module = torch.nn.Linear(4, 4)
    host = [p.data for p in module.parameters()]
    seen = []

    def fn(x, t):
        seen.append({p.device.type for p in module.parameters()})
        return module(x)

    held = HeldTeacher(fn, module, "meta", offload=True)
    out = held(torch.zeros(2, 4, device="meta"), torch.zeros(2, device="meta"))
    assert out.device.type == "meta" and seen == [{"meta"}]
    assert all(p.device.type == "cpu" for p in module.parameters())
    assert all(torch.equal(p.data, h) for p, h in zip(module.parameters(), host, strict=True))
    assert not HeldTeacher(fn, torch.nn.Linear(4, 4), "cpu", offload=True).offload  # on the CPU: nothing to move


def test_bad_teacher_settings_are_named():
    with pytest.raises(ConfigError, match="teacher_dtype"):
        make_config("tiny-28-scd", None, ["teacher_dtype=int8", "teacher=diffusers:/x"])
    with pytest.raises(ConfigError, match="teacher_dtype"):
        make_config("tiny-28-sct", None, ["teacher_dtype=bf16"])
    with pytest.raises(ConfigError, match="own frozen base"):
        make_config("tiny-28-scd", None, ["teacher_dtype=bf16", "lora.rank=4", "teacher=diffusers:/x"])
    with pytest.raises(ConfigError, match="teacher_offload"):
        make_config("tiny-28-scd", None, ["teacher_offload=true", "distributed=fsdp", "teacher=diffusers:/x"])


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    make_model, make_scheduler = FAMILIES["sd3"]
    torch.manual_seed(0)
    return _folder(tmp_path_factory.mktemp("sd3") / "pipe", make_model(), make_scheduler())


def test_scd_with_a_bf16_teacher_on_the_command_line(captioned, sd3_folder, tmp_path):
    data, _ = captioned
    code, text = cli("train", "--preset", "tiny-28-scd", "--data", data, "--out", tmp_path / "run", "--teacher",
                     f"diffusers:{sd3_folder}", "--kimg", 0.016, "--batch", 8, "loss.guidance=1,3",
                     "net.guidance_embed=true", "teacher_dtype=bf16", "teacher_offload=true", "precision=bf16", *RUN)
    assert code == 0, text
    assert "the teacher held in bf16" in text and "on the CPU" not in text  # (offload: a no-op on the CPU)


def test_two_fsdp_processes_with_a_sharded_teacher_equal_one_process(captioned, sd3_folder, tmp_path):
    """FSDP2 shards the teacher too (each process holds half of it between blocks): the student's weights after two
    steps equal one process's with the whole teacher (tolerance as tests/test_train.py's: fp32 sums of two
    gradients in another order)."""
    from scm.train import train

    data, _ = captioned
    overrides = ["kimg=0.016", "batch=8", *RUN, f"teacher=diffusers:{sd3_folder}", "loss.guidance=1,3",
                 "net.guidance_embed=true", "ema.snapshot_kimg=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(TESTS / "ddp_worker.py"), str(tmp_path / "two-RANK.safetensors"), "tiny-28-scd", str(data),
           str(tmp_path / "two"), *overrides, "distributed=fsdp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the teacher sharded with FSDP2 across 2 processes" in proc.stderr, proc.stderr[-3000:]
    cfg = make_config("tiny-28-scd", None, [*overrides, "grad_accum=2"], data=str(data), out=str(tmp_path / "one"))
    one = train(cfg).net.state_dict()
    two = load_file(tmp_path / "two-0.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-6)
