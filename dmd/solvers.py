"""Closed-form linear regressions y ~ K x from second moments (column convention).

Given C_xx = E[x x^T] and C_yx = E[y x^T] (d x d, float64, on CPU or GPU), and
alpha_abs = alpha * tr(C_xx) / d (``alpha`` is *relative* to the mean eigenvalue
of C_xx, so it does not depend on the scale of the activations):

- ``ridge``: K = C_yx (C_xx + alpha_abs I)^-1;
- ``pcr``:   ridge restricted to the top-r eigenvectors U_r of C_xx,
             K = C_yx U_r (U_r^T C_xx U_r + alpha_abs I)^-1 U_r^T;
- ``rrr``:   reduced-rank regression (Kostic et al., 2022): V = the top-r
             generalised eigenvectors of C_xy C_yx v = s^2 (C_xx + alpha_abs I) v,
             normalised so that V^T (C_xx + alpha_abs I) V = I, and K = C_yx V V^T,
             the ridge solution K_ridge projected onto them
             (K = K_ridge (C_xx + alpha_abs I) V V^T).

With alpha = 0 the inverse is a pseudo-inverse: directions of C_xx whose
eigenvalue is below d * eps * the largest are dropped. ``rank=None`` means full
rank (pcr and rrr then equal ridge). Each solver returns (K, basis) where basis
is an orthonormal d x r basis of K's row space (None at full rank), the
subspace in which exact DMD reads K's non-zero spectrum.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

SOLVERS = ("ridge", "pcr", "rrr")


class Solution(NamedTuple):
    K: Tensor  # (d, d)
    basis: Optional[Tensor]  # (d, r) orthonormal, or None at full rank


def absolute_alpha(cxx: Tensor, alpha: float) -> float:
    """alpha relative to the mean eigenvalue of C_xx -> the ridge added to C_xx."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return float(alpha) * float(torch.trace(cxx)) / cxx.shape[0]


def _spectrum(cxx: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Eigen-pairs of C_xx + alpha_abs I, largest first, numerically null ones dropped."""
    s, U = torch.linalg.eigh(cxx)
    s, U = s.flip(0) + absolute_alpha(cxx, alpha), U.flip(1)
    keep = s > s[0].clamp_min(0) * cxx.shape[0] * torch.finfo(cxx.dtype).eps
    return s[keep], U[:, keep]


def _check_rank(rank: Optional[int], d: int) -> None:
    if rank is not None and not 1 <= rank <= d:
        raise ValueError(f"rank must be in 1..{d} (or None for full rank), got {rank}")


def ridge(cxx: Tensor, cyx: Tensor, alpha: float) -> Solution:
    s, U = _spectrum(cxx, alpha)
    return Solution((cyx @ U) / s @ U.T, None)


def pcr(cxx: Tensor, cyx: Tensor, alpha: float, rank: Optional[int]) -> Solution:
    _check_rank(rank, cxx.shape[0])
    if rank is None:
        return ridge(cxx, cyx, alpha)
    s, U = _spectrum(cxx, alpha)
    s, U = s[:rank], U[:, :rank]
    return Solution((cyx @ U) / s @ U.T, U)


def rrr(cxx: Tensor, cyx: Tensor, alpha: float, rank: Optional[int]) -> Solution:
    _check_rank(rank, cxx.shape[0])
    if rank is None:
        return ridge(cxx, cyx, alpha)
    s, U = _spectrum(cxx, alpha)
    F = U / s.sqrt()  # F^T (C_xx + alpha I) F = I on the kept directions
    M = cyx @ F
    _, W = torch.linalg.eigh(M.T @ M)  # whitened form of C_xy C_yx v = s^2 (C_xx + alpha I) v
    V = F @ W.flip(1)[:, :rank]
    return Solution((cyx @ V) @ V.T, torch.linalg.qr(V).Q)


def solve(cxx: Tensor, cyx: Tensor, solver: str, alpha: float, rank: Optional[int]) -> Solution:
    """Dispatch on the solver name (one of SOLVERS)."""
    if solver == "ridge":
        return ridge(cxx, cyx, alpha)
    if solver == "pcr":
        return pcr(cxx, cyx, alpha, rank)
    if solver == "rrr":
        return rrr(cxx, cyx, alpha, rank)
    raise ValueError(f"unknown DMD solver '{solver}'; expected one of {', '.join(SOLVERS)}")
