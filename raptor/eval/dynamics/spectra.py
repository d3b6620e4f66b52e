"""Exact DMD of the depth flow per token group (Appendix D): per image, the group's tokens
averaged per layer and l2-normalised, x_0 .. x_L on the unit sphere; X1 = [x_0 .. x_{L-1}],
X2 = [x_1 .. x_L], fitted by `dmd.exact.exact_dmd` at the configured rank (at most the rank
of X1, itself at most L)."""

from __future__ import annotations

import torch
from torch import Tensor

from dmd.exact import ExactDMD, exact_dmd
from raptor.eval.dynamics.directions import unit


def group_states(traj: Tensor, tokens: slice) -> Tensor:
    """traj (B, L+1, T, D) -> unit group means (B, L+1, D)."""
    return unit(traj[:, :, tokens].to(torch.float64).mean(2))


def image_dmd(states: Tensor, rank: int) -> ExactDMD:
    """One image's unit group states (L+1, D) -> its exact DMD."""
    return exact_dmd(states[:-1].T, states[1:].T, rank)
