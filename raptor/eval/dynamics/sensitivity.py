"""The perturbation protocol (Appendix C): x~_l = x_l + eps u, u ~ N(0, I_d) per token, run
on through the model's own layers l+1..L; the sensitivity is the terminal cosine distance
d_cos = 1 - <x_hat_L^(eps, l), x_hat_L> scaled by 1 / |eps|, for l = 0..L (l = L perturbs
the final state itself)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from raptor.eval.dynamics.directions import unit

Step = Callable[[Tensor, int], Tensor]  # (a_{l-1} (B, T, D), l) -> a_l


@torch.no_grad()
def sensitivity(step: Step, traj: Tensor, eps: float, noise: Tensor) -> Tensor:
    """traj (B, L+1, T, D) of the model whose `step` continues it; noise (B, L+1, T, D) the
    u of every injection layer -> sensitivity (B, L+1, T)."""
    L = traj.shape[1] - 1
    final = unit(traj[:, L])
    out = []
    for layer in range(L + 1):
        x = traj[:, layer] + eps * noise[:, layer].to(traj.device, traj.dtype)
        for nxt in range(layer + 1, L + 1):
            x = step(x, nxt)
        out.append((1 - (unit(x) * final).sum(-1)) / abs(eps))
    return torch.stack(out, 1)
