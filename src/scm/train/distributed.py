"""One process or many (torchrun): process group, device, DDP / FSDP2 wrapping and full state dicts.

The same code runs on one CPU, one GPU or `torchrun --nproc_per_node N`. Under torchrun the network is
wrapped in DistributedDataParallel (default) or sharded with FSDP2's `fully_shard`. The objective calls the
wrapped network for the training pass (so gradients are all-reduced) and for the tangent pass under
no_grad, which never touches the gradient-sync machinery; tests check that every rank ends with the
weights of a single process that ran the same global batch.

When another process of the run stops (killed, its machine lost) or stops answering, the collective a process
waits in fails: at once when the peer's connection closes, else after the collective timeout
(SCM_COLLECTIVE_TIMEOUT seconds, default 600). `peer_failures` turns that failure into a TrainingStopped
(reason "peer") that names this process, the peer where it is known and the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from scm.devices import resolve_device
from scm.errors import ConfigError, ScmError, TrainingStopped

__all__ = ["TIMEOUT_VARIABLE", "DistInfo", "collective_timeout", "init_distributed", "peer_failures", "wrap_model"]

# How long a collective waits for the other processes before it fails (seconds): torch's own default for NCCL
# (10 minutes; gloo's is 30), long enough for the longest wait of a healthy run (the main process alone writes a
# checkpoint or a sample grid while the others wait in a barrier), short enough that a lost node ends the run.
TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S = "SCM_COLLECTIVE_TIMEOUT", 600.0

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=collective_timeout())
    return DistInfo(rank, world, local_rank, device)


def collective_timeout() -> datetime.timedelta:
    """The process group's timeout: SCM_COLLECTIVE_TIMEOUT seconds (DEFAULT_TIMEOUT_S when unset). A collective that
    waits longer for another process fails (gloo raises; NCCL's watchdog ends the process)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{TIMEOUT_VARIABLE}={text!r}: must be a number of seconds > 0 (unset: "
                          f"{DEFAULT_TIMEOUT_S:g})", key=TIMEOUT_VARIABLE)
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def peer_failures(info: DistInfo, latest: Callable[[], Path | None]) -> Iterator[None]:
    """Raise a collective's failure that says another process of the run stopped or stopped answering (its connection
    closed, a timeout) as TrainingStopped(reason="peer"), naming this process, the peer (where the backend's message
    or the world size tells), the backend's reason and the checkpoint `latest()` names (the one to resume from).
    Other errors pass unchanged; outside torchrun this does nothing."""
    try:
        yield
    except Exception as e:
        reason = _peer_lost(e) if info.enabled else None
        if reason is None:
            raise
        ckpt = None
        with contextlib.suppress(ScmError, OSError):  # only to name it: a run directory in any state will do
            ckpt = latest()
        raise TrainingStopped(_peer_message(info, reason, ckpt), reason="peer", checkpoint=ckpt) from e


_PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "timed out", "timeout",
              "remote process exited", "aborted")


def _peer_lost(error: BaseException) -> str | None:
    """The backend's one-line reason when `error` (or an error it was raised from) is a collective that lost a peer;
    None for any other error. gloo raises RuntimeErrors that name its source ("…/gloo/transport/tcp/pair.cc:553]
    Connection closed by peer [10.0.0.2]:45698. …"), NCCL and the stores torch.distributed's DistError."""
    seen = 0
    while error is not None and seen < 5:
        text = str(error)
        backend = isinstance(error, getattr(dist, "DistError", ())) or re.search(r"gloo|nccl|c10d", text, re.I)
        if backend and any(p in text.lower() for p in _PEER_LOST):
            line = re.sub(r"^\s*\[[^\]]*\]\s*", "", text.strip().splitlines()[0])  # gloo's "[file.cc:553] "
            return re.split(r"\.\s", line, maxsplit=1)[0].rstrip(".")[:200]
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _peer_message(info: DistInfo, reason: str, ckpt: Path | None) -> str:
    node, nodes = os.environ.get("GROUP_RANK"), os.environ.get("GROUP_WORLD_SIZE")
    where = f"node {node} of {nodes}, " if node is not None and nodes is not None else ""
    me = f"rank {info.rank} of {info.world} ({where}host {socket.gethostname()})"
    peer = f"rank {1 - info.rank}" if info.world == 2 else "another rank"
    waited = ""
    if "timed out" in reason.lower() or "timeout" in reason.lower():
        waited = f" (no answer within {collective_timeout().total_seconds():g} s, {TIMEOUT_VARIABLE})"
    resume = (f"the last checkpoint is {ckpt} (step {int(ckpt.name)})" if ckpt is not None
              else "no checkpoint was written yet")
    return (f"a peer process of the distributed run stopped or stopped answering: {me} lost {peer}: {reason}{waited}; "
            f"{resume}")


def wrap_model(net: nn.Module, info: DistInfo, mode: str) -> nn.Module:
    """DDP or FSDP2 under torchrun; the module itself otherwise."""
    if not info.enabled:
        return net
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in list(net.enc.values()) + list(net.dec.values()) if hasattr(net, "enc") else []:
            fully_shard(block)
        fully_shard(net)
        return net
    ids = [info.device.index] if info.device.type == "cuda" else None
    # find_unused_parameters stays off: only then may an objective call the network more than once before its one
    # backward pass (sCD + VSD: the sCD pass, then the one-step samples), each parameter's gradient hook firing once
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def shard_evaluated(module: nn.Module) -> nn.Module:
    """FSDP2 on a network that is only evaluated (the sCD teacher under distributed=fsdp): each block of it (the
    members of its module lists and dicts) and then the rest sharded across the processes, a block's weights
    gathered for its forward and freed after, so a process holds 1/world of the teacher between blocks."""
    from torch.distributed.fsdp import fully_shard

    blocks, inside = [], set()
    for name, m in module.named_modules():
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and not any(name.startswith(b + ".") for b in inside):
            for child_name, child in m.named_children():
                if any(p.numel() for p in child.parameters()):
                    blocks.append(child)
                    inside.add(f"{name}.{child_name}" if name else child_name)
    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    return module


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, enabled: bool):
    """Skip gradient synchronization (for all but the last micro-batch of an accumulated step)."""
    if not enabled:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def ctx():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return ctx()
    return contextlib.nullcontext()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(unwrap(model), options=_FULL)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Full (unsharded) tensors into the model; strict=False: `state` holds part of it (a LoRA student's trained
    tensors, checked against the checkpoint's expected names before)."""
    set_model_state_dict(unwrap(model), state, options=_FULL if strict else dataclasses.replace(_FULL, strict=False))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The full optimizer state as flat tensors ("<param>/<key>") plus JSON-able metadata (on rank 0; other
    ranks take part in the gathering and get empty results)."""
    sd = get_optimizer_state_dict(unwrap(model), opt, options=_FULL)
    tensors, scalars = {}, {}
    for name, st in sd.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v
            else:
                scalars[f"{name}/{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd.get("param_groups", [])]
    return tensors, {"scalars": scalars, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[str, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    set_optimizer_state_dict(unwrap(model), opt, {"state": state, "param_groups": groups}, options=_FULL)


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= info.world
    return x


def disagreement(value: int, info: DistInfo, name: Callable[[int], str] = str) -> str | None:
    """None when every process holds the same `value`; else which ranks hold which value, for a message:
    "step 4 on rank(s) 0–7; no checkpoint on rank(s) 8–15" (`name` words a value)."""
    if not info.enabled:
        return None
    mine = torch.tensor([value], dtype=torch.int64, device=info.device)
    every = [torch.empty_like(mine) for _ in range(info.world)]
    dist.all_gather(every, mine)
    ranks: dict[int, list[int]] = {}
    for rank, v in enumerate(every):
        ranks.setdefault(int(v.item()), []).append(rank)
    if len(ranks) == 1:
        return None
    return "; ".join(f"{name(v)} on rank(s) {_spans(r)}" for v, r in sorted(ranks.items(), reverse=True))


def _spans(ranks: list[int]) -> str:
    """Rank numbers, consecutive ones as spans: "3", "0, 2", "0–7", "0–3, 8–11"."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    """End a torchrun process's process group while the interpreter is whole. No-op outside torchrun.

    A barrier first (no rank tears gloo/NCCL down while another still communicates), then
    destroy_process_group, then whatever else keeps the group alive, so that it is freed here. A group left for
    interpreter exit can abort a process that finished its work ("terminate called without an active
    exception", about 1 run in 60 of the two-rank FSDP2 test before this): a gloo worker thread that frees a
    finished collective's tensors must take the GIL, and during finalization that ends the thread inside a
    C++ destructor (a core dump showed it). What keeps the group: the trained model (drop it, and anything
    holding it such as a TrainResult, before calling this) and, under FSDP2, torch's DTensor caches, which
    hold the device mesh and through it the group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    _clear_dtensor_caches()
    gc.collect()


def _clear_dtensor_caches() -> None:
    """Empty torch's DTensor caches, which hold device meshes: every functools cache that torch.distributed's code
    made, wherever it lives (module functions, methods, a per-thread wrapper's copy, closures such as torch 2.11's
    single-dimension strategy expansion), the redistribution planner's and the C++ fast path's. Emptying a cache is
    always safe (it is refilled on use); which caches exist is private to torch and changes between releases, so
    they are found among the live objects rather than by name."""
    for obj in gc.get_objects():
        if type(obj) is functools._lru_cache_wrapper and (obj.__module__ or "").startswith("torch.distributed"):
            obj.cache_clear()
    with contextlib.suppress(ImportError, AttributeError):
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

        clear_redistribute_planner_cache()  # a plain dict
    with contextlib.suppress(AttributeError):
        torch._C._clear_DTensor_sharding_propagator_cache()
