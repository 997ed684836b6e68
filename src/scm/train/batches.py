"""Which examples and which random numbers each step uses: a pure function of (seed, step, slot).

A global batch is split into `slots` = processes × micro-batches of equal size; slot s of step k always
gets the same examples, the same noise generator and the same dropout seed (and, on a data set with prompt
embeddings, the same caption of each example and the same caption dropout), whatever the number of
processes or the accumulation. So a run resumed from a checkpoint continues exactly, and two processes
with one micro-batch each compute what one process computes with two micro-batches.
"""

from __future__ import annotations

import torch

from scm.conditioning import Conditioning
from scm.data.dataset import Dataset
from scm.runs import mix_seed
from scm.train.step import MicroBatch

__all__ = ["BatchPlan", "micro_batches"]


class BatchPlan:
    """The examples of every step (`indices`, `slot`) and the seeds of its noise and dropout."""

    def __init__(self, num_examples: int, batch: int, seed: int):
        self.n, self.batch, self.seed = num_examples, batch, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xDA7A))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """The global batch of step `step`: consecutive positions in a sequence of per-epoch permutations."""
        start = step * self.batch
        out, pos = [], start
        while pos < start + self.batch:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + self.batch - pos)
            out.append(self._permutation(epoch)[offset: offset + take])
            pos += take
        return torch.cat(out)

    def slot(self, step: int, slot: int, slots: int) -> torch.Tensor:
        size = self.batch // slots
        return self.indices(step)[slot * size: (slot + 1) * size]

    def noise_generator(self, step: int, slot: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device).manual_seed(mix_seed(self.seed, step, slot, 1))

    def dropout_seed(self, step: int, slot: int) -> int:
        return mix_seed(self.seed, step, slot, 2)

    def caption_generator(self, step: int, slot: int) -> torch.Generator:
        """The CPU generator that picks each example's caption among its captions (`Dataset.batch`'s `choice`)."""
        return torch.Generator().manual_seed(mix_seed(self.seed, step, slot, 3))

    def caption_dropout_generator(self, step: int, slot: int) -> torch.Generator:
        """The CPU generator of caption dropout: which examples see the empty prompt (`Conditioning.from_batch`)."""
        return torch.Generator().manual_seed(mix_seed(self.seed, step, slot, 4))


def micro_batches(data: Dataset, plan: BatchPlan, step: int, rank: int, grad_accum: int, world: int,
                  conditioning: Conditioning, device) -> list[MicroBatch]:
    """This process's micro-batches of step `step` (slots rank·grad_accum … rank·grad_accum + grad_accum − 1), with
    the conditioning tensors the run's network takes: on a data set with prompt embeddings, one caption of each
    example, drawn by the slot's caption generator, and, for a run on prompts, the slot's caption dropout."""
    out, text = [], getattr(data, "text", None) is not None
    for a in range(grad_accum):
        slot = rank * grad_accum + a
        index = plan.slot(step, slot, world * grad_accum)
        if text:
            x0, cond = data.batch(index, device, choice=plan.caption_generator(step, slot))
        else:
            x0, cond = data.batch(index, device)
        if getattr(conditioning, "text", None) is not None:
            cond = conditioning.from_batch(cond, plan.caption_dropout_generator(step, slot))
        else:
            cond = conditioning.from_batch(cond)
        out.append(MicroBatch(x0, cond, plan.noise_generator(step, slot, device), plan.dropout_seed(step, slot)))
    return out
