"""More than one machine, emulated on this one: two `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`
invocations (one per node, gloo on the CPU) run `-m scm train`. They must end with the weights of one process that
trains the same global batch (DDP and FSDP2); a node killed with SIGKILL (or frozen with SIGSTOP) must end the other
node within a bounded time, with a named error, and the run must then resume to the weights of an uninterrupted run;
nodes that see different run directories must refuse to resume, and nodes that read different data to train."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from scm.config import make_config
from scm.errors import ConfigError
from scm.runs import RunDir
from scm.train import train
from scm.train.distributed import DEFAULT_TIMEOUT_S, _peer_lost, collective_timeout

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

PRESET = "tiny-28-diffusion"
# 8 steps of a global batch of 16 (8 per node), a checkpoint every 2 steps; a small U-Net (28×28 and 14×14, no
# attention layer: none at 7×7), one small sample grid at the end
SETTINGS = ["kimg=0.128", "batch=16", "ckpt_every_kimg=0.032", "log_every=2", "net.model_channels=16",
            "net.channel_mult=1,2", "net.num_blocks=1", "net.attn_resolutions=7", "progress=false",
            "tensorboard=false", "sample_every_kimg=None", "sample_count=4", "sample_ode_steps=2"]
ENDS_WITHIN_S = 60  # the other node must end this soon after one is killed


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from conftest import make_shapes

    images, labels = make_shapes(64)
    path = tmp_path_factory.mktemp("multinode") / "shapes.npz"
    np.savez(path, x=images[..., 0], y=labels)
    return path


class Node:
    """One `torchrun --nnodes 2` invocation (a machine of the cluster), its output in a file. torchrun starts its
    worker in a session of its own: killing a node kills both process groups, as losing the machine would."""

    def __init__(self, index: int, port: int, args: list, log: Path, env: dict, cwd: Path | None = None):
        self.index, self.log = index, log
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}",
               "--rdzv-conf", f"is_host={str(index == 0).lower()}",  # node 0 hosts the rendezvous store
               "-m", "scm", "train", *[str(a) for a in args]]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)

    def workers(self) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except OSError:
            return []

    def rank(self) -> int | None:
        """The global rank of this node's worker (the c10d rendezvous assigns it), once it runs."""
        for pid in self.workers():
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            return int(env[b"RANK"])
        return None

    def signal(self, sig: int) -> None:
        """`sig` to the worker's process group and the agent's (while the agent runs: its ids are still ours)."""
        if self.proc.poll() is not None:
            return
        for pgid in [*self.workers(), self.proc.pid]:  # the worker first: it must not outlive its agent
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)

    def wait(self, timeout: float) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.log.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path: Path, name: str, args: list, env: dict | None = None, cwds=(None, None)) -> list[Node]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return [Node(i, port, args, tmp_path / f"{name}-node{i}.log", env, cwds[i]) for i in range(2)]


def _run_two_nodes(tmp_path: Path, name: str, args: list, **kw) -> list[str]:
    nodes = _two_nodes(tmp_path, name, args, **kw)
    try:
        results = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.signal(signal.SIGKILL)
    for code, text in results:
        assert code == 0, text[-4000:]
    return [text for _, text in results]


def _args(data: Path, out, *extra) -> list:
    return ["--preset", PRESET, "--data", data, "--out", out, *SETTINGS, *extra]


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA and optimizer state of a run's newest checkpoint (rank 0 gathers and writes them)."""
    ckpt = RunDir(run).latest()
    return {f"{s}/{k}": v for s in ("net", "ema", "optim") for k, v in load_file(ckpt / f"{s}.safetensors").items()}


def _one_process(data: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    """This process alone, the two nodes' micro-batches accumulated: the same global batch, step by step."""
    cfg = make_config(PRESET, None, [*SETTINGS, *extra, "grad_accum=2"], data=str(data), out=str(out))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each node's worker (OMP_NUM_THREADS=1): two threads on two busy cores crawl
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    return _checkpoint(out)


@pytest.fixture(scope="module")
def ddp_run(shapes, tmp_path_factory):
    """An uninterrupted two-node DDP run (the reference of the resumed one)."""
    tmp = tmp_path_factory.mktemp("ddp")
    texts = _run_two_nodes(tmp, "ddp", _args(shapes, tmp / "run"))
    assert "2 process(es) on cpu" in texts[0] + texts[1]
    return tmp / "run"


def test_two_nodes_equal_one_process_ddp(ddp_run, shapes, tmp_path):
    """Bit for bit: each node's gradient is divided by 2 (exact in binary) and gloo sums the two; the one process
    sums its two micro-batches' gradients, each divided by 2: the same numbers in the same order, one thread each."""
    two, one = _checkpoint(ddp_run), _one_process(shapes, tmp_path / "one")
    assert two.keys() == one.keys() and len(one) > 50
    for k in one:
        assert torch.equal(two[k], one[k]), k


def test_two_nodes_equal_one_process_fsdp(shapes, tmp_path):
    """The tolerance of tests/test_train.py's two-process check: FSDP2's reduce-scatter sums the gradients in
    another order than accumulation does (measured: up to 6e-8, 1 ulp, after 4 steps); the node layout adds no
    arithmetic of its own."""
    fsdp = ["distributed=fsdp", "kimg=0.064"]  # 4 steps
    _run_two_nodes(tmp_path, "fsdp", _args(shapes, tmp_path / "two", *fsdp))
    two, one = _checkpoint(tmp_path / "two"), _one_process(shapes, tmp_path / "one", *fsdp)
    assert two.keys() == one.keys() and len(one) > 50
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-6, msg=k)


def _start_and_stop_node_1(tmp_path: Path, args: list, sig: int, env: dict) -> tuple[Node, Node, float]:
    """Two nodes; once the first checkpoint is written, `sig` to every process of the node whose worker is rank 1.
    Returns (the other node, the stopped node, when)."""
    nodes = _two_nodes(tmp_path, signal.Signals(sig).name, args, env)
    latest = Path(args[args.index("--out") + 1]) / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and not latest.exists() and all(n.proc.poll() is None for n in nodes):
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint: " + nodes[0].log.read_text()[-3000:]
    lost = next(n for n in nodes if n.rank() == 1)
    other = nodes[1 - nodes.index(lost)]
    lost.signal(sig)
    return other, lost, time.monotonic()


def test_sigkill_of_one_node_ends_the_other_with_a_named_error_and_the_run_resumes(ddp_run, shapes, tmp_path):
    out = tmp_path / "run"
    other, lost, killed = _start_and_stop_node_1(tmp_path, _args(shapes, out), signal.SIGKILL, {})
    try:
        code, text = other.wait(timeout=ENDS_WITHIN_S)
    finally:
        other.signal(signal.SIGKILL)
        lost.signal(signal.SIGKILL)
    took = time.monotonic() - killed
    assert code != 0 and "exitcode  : 4" in text, text[-4000:]  # torchrun reports the worker's exit code 4
    error = next(line for line in text.splitlines() if line.startswith("error: "))
    assert "a peer process of the distributed run stopped" in error and "rank 0 of 2 (node 0 of 2" in error
    assert "lost rank 1" in error and "last checkpoint is" in error and "--resume" in error, error
    print(f"the other node ended {took:.1f} s after the kill: {error}")
    ckpt = RunDir(out).latest()
    RunDir.load(ckpt)  # intact: every file against its digest
    assert str(ckpt) in error
    texts = _run_two_nodes(tmp_path, "resumed", _args(shapes, out, "--resume"))
    assert f"resumed from {ckpt}" in texts[0] + texts[1]
    a, b = _checkpoint(ddp_run), _checkpoint(out)
    assert RunDir(out).latest().name == "000000008" and a.keys() == b.keys()
    for k in a:  # the same two processes, the same arithmetic: bit for bit
        assert torch.equal(a[k], b[k]), k


def test_a_frozen_node_ends_the_other_after_the_collective_timeout(shapes, tmp_path):
    """SIGSTOP keeps node 1's connections open (a machine that hangs, a network that drops packets): only the
    collective timeout (SCM_COLLECTIVE_TIMEOUT, here 4 s) ends the other node; before, gloo waited 30 minutes."""
    other, lost, stopped = _start_and_stop_node_1(tmp_path, _args(shapes, tmp_path / "run"), signal.SIGSTOP,
                                                  {"SCM_COLLECTIVE_TIMEOUT": "4"})
    try:
        code, text = other.wait(timeout=ENDS_WITHIN_S)
    finally:
        other.signal(signal.SIGKILL)
        lost.signal(signal.SIGKILL)
    took = time.monotonic() - stopped
    error = next((line for line in text.splitlines() if line.startswith("error: ")), text[-4000:])
    assert code != 0 and "lost rank 1" in error and "no answer within 4 s, SCM_COLLECTIVE_TIMEOUT" in error, error
    assert took < 4 + 20, took
    print(f"the other node ended {took:.1f} s after SIGSTOP: {error}")
    RunDir.load(RunDir(tmp_path / "run").latest())


def test_nodes_that_see_different_run_directories_refuse_to_resume(ddp_run, shapes, tmp_path):
    """`--out run` from two working directories, as two machines without a shared filesystem: rank 0 sees the run
    (a copy of the two-node run), rank 1 sees none; resuming must not let them continue from different checkpoints."""
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shutil.copytree(ddp_run, shared / "run")
    elsewhere.mkdir()
    nodes = _two_nodes(tmp_path, "resume", _args(shapes, "run", "--resume", "kimg=0.16"), cwds=(shared, elsewhere))
    try:
        results = [node.wait(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            node.signal(signal.SIGKILL)
    for code, text in results:
        assert code != 0 and "found different checkpoints in it (step 8 on rank(s) 0; no checkpoint on rank(s) 1)" \
            in text and "shared filesystem" in text, text[-3000:]
    assert RunDir(shared / "run").latest().name == "000000008"


@pytest.mark.parametrize("second", ["other shapes", "fewer shapes"])
def test_nodes_that_read_different_data_refuse_to_train(second, tmp_path):
    """`--data shapes.npz` from two working directories, as two machines with their own copies: a copy with other
    items of the same count (its fingerprint) or with fewer items (its size) must stop both before the first step."""
    from conftest import make_shapes

    one, other = tmp_path / "one", tmp_path / "other"
    for folder, (images, labels) in ((one, make_shapes(64)), (other, make_shapes(64 if second == "other shapes"
                                                                                  else 48, seed=1))):
        folder.mkdir()
        np.savez(folder / "shapes.npz", x=images[..., 0], y=labels)
    nodes = _two_nodes(tmp_path, "data", _args("shapes.npz", tmp_path / "run"), cwds=(one, other))
    try:
        results = [node.wait(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            node.signal(signal.SIGKILL)
    what = "fingerprint" if second == "other shapes" else "48 items on rank(s)"
    for code, text in results:
        assert code != 0 and "the processes of this run read different data" in text and what in text, text[-3000:]
    assert not RunDir(tmp_path / "run").latest()


def test_the_collective_timeout_setting(monkeypatch):
    monkeypatch.delenv("SCM_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv("SCM_COLLECTIVE_TIMEOUT", "90")
    assert collective_timeout().total_seconds() == 90
    for bad in ("ten", "0", "-5", "nan"):
        monkeypatch.setenv("SCM_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"SCM_COLLECTIVE_TIMEOUT='{bad}': must be a number of seconds > 0"):
            collective_timeout()


def test_which_errors_are_a_lost_peer():
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:45698. " \
           "This is typically caused by a remote worker crashing. Check the logs of the remote worker."
    assert _peer_lost(RuntimeError(gloo)) == "Connection closed by peer [10.0.0.2]:45698"
    timeout = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv"
    assert _peer_lost(RuntimeError(timeout)) == "Timed out waiting 5000ms for recv"
    try:  # raised from it, as a hook may
        try:
            raise RuntimeError(gloo)
        except RuntimeError as e:
            raise RuntimeError("backward failed") from e
    except RuntimeError as e:
        assert _peer_lost(e) == "Connection closed by peer [10.0.0.2]:45698"
    for other in (RuntimeError("CUDA out of memory"), ValueError("timed out"),
                  RuntimeError("[gloo/allreduce.cc:20] Mismatched tensor sizes")):
        assert _peer_lost(other) is None
