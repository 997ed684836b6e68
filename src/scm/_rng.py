"""Replaying the global RNG of a device, so that several network calls draw the same dropout masks."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rng_replayer(device: torch.device | str) -> Callable[[], None]:
    """Snapshot the global RNG that `device`'s kernels draw from; the returned callable rewinds to it.

    Calling it before each of several network evaluations makes them draw identical random numbers
    (dropout masks): the evaluations see one and the same function.
    """
    device = torch.device(device)
    if device.type == "cpu":
        state = torch.get_rng_state()
        return lambda: torch.set_rng_state(state)
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "get_rng_state"):
        raise ValueError(f"cannot snapshot the RNG of device {device}")
    index = device.index if device.index is not None else module.current_device()
    state = module.get_rng_state(index)
    return lambda: module.set_rng_state(state, index)
