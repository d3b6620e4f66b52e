"""Exact DMD of a snapshot sequence (Tu et al. 2014; the Raptor paper's Appendix D).

Given snapshots X1 = [x_0 .. x_{n-1}] and X2 = [x_1 .. x_n] as columns (d, n), fit the
linear step A with X2 ~ A X1 through the thin SVD X1 = U S V^T truncated at rank r:
the reduced operator A~ = U_r^T X2 V_r S_r^-1 (r, r), its eigenpairs A~ W = W diag(lam),
and the exact modes Phi = X2 V_r S_r^-1 W (d, r). No affine offset. Computed in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ExactDMD(NamedTuple):
    """eigenvalues (r,) complex128, largest modulus first; modes (d, r) complex128 in the same
    order; singular_values (min(d, n),) float64 of X1, all of them (the spectral decay)."""

    eigenvalues: Tensor
    modes: Tensor
    singular_values: Tensor

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())


def exact_dmd(x1: Tensor, x2: Tensor, rank: int, rtol: float = 1e-10) -> ExactDMD:
    """Exact DMD of X2 ~ A X1 (both (d, n), snapshots as columns) at rank
    min(`rank`, numerical rank of X1): singular values below `rtol` times the largest are
    left out, so a sequence confined to a subspace gives only the eigenvalues it determines."""
    if x1.ndim != 2 or x1.shape != x2.shape:
        raise ValueError(
            f"X1 and X2 must be (d, n) of one shape, got {tuple(x1.shape)}, {tuple(x2.shape)}"
        )
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    x1, x2 = x1.to(torch.float64), x2.to(torch.float64)
    u, s, vh = torch.linalg.svd(x1, full_matrices=False)
    kept = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    r = min(int(rank), kept)
    if r == 0:
        empty = torch.zeros(0, dtype=torch.complex128)
        return ExactDMD(empty, torch.zeros(x1.shape[0], 0, dtype=torch.complex128), s)
    ur, sr, vr = u[:, :r], s[:r], vh[:r].T
    right = x2 @ vr / sr  # X2 V_r S_r^-1 (d, r)
    lam, w = torch.linalg.eig(ur.T @ right)
    order = torch.argsort(lam.abs(), descending=True)
    lam, w = lam[order], w[:, order]
    return ExactDMD(lam, right.to(torch.complex128) @ w, s)


__all__ = ["ExactDMD", "exact_dmd"]
