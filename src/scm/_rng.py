"""Random numbers: replaying a device's global RNG (so several network calls draw the same dropout masks), and
noise drawn from one generator or one generator per example."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape` [B, ...] from one generator, or from one generator per example (a
    sequence of B generators, each drawing its own example: EDM2's per-image seeds, so that an example's noise
    does not depend on the batch it is drawn in)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-example generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
