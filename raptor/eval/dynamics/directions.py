"""Norms and directions along depth: x_hat_l = x_l / |x_l| on the unit sphere.

- directional convergence gamma_l = <x_hat_l, x_hat_L> (Appendix C);
- angular speed s_l = arccos <x_hat_{l+1}, x_hat_l>, computed as 2 atan2(|a - b|, |a + b|),
  the same angle without arccos's loss of precision near 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

TINY = 1e-30


def unit(x: Tensor) -> Tensor:
    """x / |x| along the last dimension, in float64 (a zero vector stays zero)."""
    x = x.to(torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(TINY)


def angle(a: Tensor, b: Tensor) -> Tensor:
    """The angle between unit vectors a and b (last dimension), in radians."""
    return 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def convergence(hat: Tensor) -> Tensor:
    """Unit trajectory (B, L+1, T, D) -> gamma (B, L+1, T) = <x_hat_l, x_hat_L>."""
    return (hat * hat[:, -1:]).sum(-1)


def angular_speed(hat: Tensor) -> Tensor:
    """Unit trajectory (B, L+1, T, D) -> s (B, L, T), the angle from layer l to l+1."""
    return angle(hat[:, 1:], hat[:, :-1])
