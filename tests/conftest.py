from __future__ import annotations

import math

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


class SmallNet(nn.Module):
    """A small smooth network with the scm calling convention, for tests: net(x_t/σ_d, t, labels=None,
    guidance=None, return_weight=False) -> F (or (F, w)). Works on [B, D] vectors or [B, C, H, W] images
    (flattened), with optional dropout, class labels and a guidance input."""

    def __init__(self, dim: int, hidden: int = 32, dropout: float = 0.0, num_classes: int = 0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim, self.emb = dim, 8
        self.num_classes = num_classes
        self.inp = nn.Linear(dim + 2 * self.emb + num_classes + 1, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        self.weight_head = nn.Linear(2 * self.emb, 1)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(1, self.emb + 1, dtype=t.dtype, device=t.device)
        a = t[:, None] * freqs
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    def forward(self, x, t, labels=None, guidance=None, return_weight=False):
        shape = x.shape
        x = x.reshape(shape[0], -1)
        e = self.embed(t.to(x.dtype))
        parts = [x, e]
        if self.num_classes:
            parts.append(torch.zeros(shape[0], self.num_classes, dtype=x.dtype) if labels is None
                         else nn.functional.one_hot(labels, self.num_classes).to(x.dtype))
        parts.append(torch.zeros(shape[0], 1, dtype=x.dtype) if guidance is None
                     else torch.as_tensor(guidance, dtype=x.dtype).reshape(-1, 1).expand(shape[0], 1))
        h = torch.tanh(self.inp(torch.cat(parts, dim=1)))
        h = self.drop(torch.tanh(self.mid(h)))
        F = self.out(h).reshape(shape)
        if return_weight:
            return F, self.weight_head(e).reshape(-1)
        return F


@pytest.fixture
def small_net():
    return SmallNet
