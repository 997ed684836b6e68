"""Which device a command runs on: the `--device` / `device=` setting ("auto", "cpu", "cuda", "cuda:N") as a
torch.device. Shared by training and the inference commands, so that sampling never loads the training engine."""

from __future__ import annotations

import os

import torch

from scm.errors import InvalidSetting

__all__ = ["available_memory", "resolve_device"]


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """"auto": the process's GPU (cuda:<local_rank>) when CUDA is available, else the CPU; "cuda" without an
    index: cuda:<local_rank>. InvalidSetting (key "device") for a device this machine does not have."""
    try:
        device = torch.device(f"cuda:{local_rank}" if spec == "auto" and torch.cuda.is_available() else
                              "cpu" if spec == "auto" else spec)
    except (RuntimeError, TypeError) as e:
        raise InvalidSetting("device", spec, f"not a device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidSetting("device", spec, "CUDA is not available on this machine")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def available_memory() -> int | None:
    """Bytes of memory this machine can give a process now (Linux: MemAvailable; elsewhere: free physical pages);
    None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
