"""A tiny linear flow network for hand-worked diffusion-method tests, and the same velocity written out.

u(x, tau, c) = a x + (tau / 1000) m + e[c] on 2-pixel images [B, 1, 1, 2]; condition ``NULL`` is the null one.
"""

from __future__ import annotations

import torch

from bench.diffusion import Generator, Sampler, Schedule

NULL = 2
E = [[0.5, -1.0], [1.0, 0.0], [0.1, 0.2]]  # class 0, class 1, null
M = [0.2, -0.1]


class LinearFlowNet(torch.nn.Module):
    """u(x, tau, c) = a x + (tau / 1000) m + e[c] on 2-pixel images [B, 1, 1, 2]."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.register_buffer("m", torch.tensor(M).view(1, 1, 1, 2))
        self.register_buffer("e", torch.tensor(E))

    def null_condition(self, cond):
        return torch.full_like(cond, NULL)

    def forward(self, x, timestep, cond, guidance=None):
        return self.a * x + (timestep / 1000.0).view(-1, 1, 1, 1) * self.m + self.e[cond].view(-1, 1, 1, 2)


def hand_u(z, t, c, a):
    """The velocity written out at flow time t (not model time): a z + t m + e[c]."""
    return a * z + t.view(-1, 1, 1, 1) * torch.tensor(M).view(1, 1, 1, 2) + torch.tensor(E)[c].view(-1, 1, 1, 2)


def flow_gen(a):
    """A flow-matching `Generator` around ``LinearFlowNet(a)`` (velocity prediction, the default sampler)."""
    return Generator(LinearFlowNet(a), schedule=Schedule("flow"), prediction="flow", sampler=Sampler())
