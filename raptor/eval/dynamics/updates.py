"""The angular update field: Delta_l^(i) = x_hat_{l+1}^(i) - x_hat_l^(i) for the tokens i of
one image form the update matrix U_l (rows); per image and layer (Appendix C):
- stable rank |U_l|_F^2 / |U_l|_2^2;
- effective rank exp(H(p)), p_j = sigma_j / sum sigma (Roy and Vetterli's entropy rank);
- coherence kappa_l = mean_i cos(Delta_l^(i), mean_i Delta_l^(i)).
Each is at most the rank of U_l; a zero update matrix has rank 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raptor.eval.dynamics.directions import TINY


def updates(hat: Tensor) -> Tensor:
    """Unit trajectory (B, L+1, N, D) -> Delta (B, L, N, D)."""
    return hat[:, 1:] - hat[:, :-1]


def ranks(delta: Tensor) -> tuple[Tensor, Tensor]:
    """Delta (B, L, N, D) -> (stable rank, effective rank), each (B, L)."""
    s = torch.linalg.svdvals(delta.to(torch.float64))
    top = s[..., 0]
    stable = torch.where(top > 0, (s**2).sum(-1) / (top**2).clamp_min(TINY), 0.0)
    p = s / s.sum(-1, keepdim=True).clamp_min(TINY)
    entropy = -(p * torch.log(p.clamp_min(TINY))).sum(-1)
    effective = torch.where(top > 0, entropy.exp(), 0.0)
    return stable, effective


def coherence(delta: Tensor) -> Tensor:
    """Delta (B, L, N, D) -> kappa (B, L); a zero update counts as cosine 0."""
    delta = delta.to(torch.float64)
    mean = delta.mean(-2, keepdim=True)
    cos = (delta * mean).sum(-1) / (delta.norm(dim=-1) * mean.norm(dim=-1)).clamp_min(TINY)
    return cos.mean(-1)
