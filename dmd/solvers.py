"""Closed-form linear regressions y ~ K x from second moments (column convention).

Given C_xx = E[x x^T] and C_yx = E[y x^T] (d x d, float64, on CPU or GPU), a ridge
a is added to C_xx. `alpha_mode` says what ``alpha`` means:

- ``relative`` (default): a = alpha * tr(C_xx) / d, alpha relative to the mean
  eigenvalue of C_xx, so it does not depend on the scale of the activations;
- ``absolute``: a = alpha, added as is (kooplearn's Tikhonov convention, and the
  values of the DMD paper's sweeps: 1e-4, 1e-5, 0).

Solvers:

- ``ridge``: K = C_yx (C_xx + a I)^-1;
- ``pcr``:   ridge restricted to the top-r eigenvectors U_r of C_xx,
             K = C_yx U_r (U_r^T C_xx U_r + a I)^-1 U_r^T;
- ``rrr``:   reduced-rank regression (Kostic et al., 2022): V = the top-r
             generalised eigenvectors of C_xy C_yx v = s^2 (C_xx + a I) v,
             normalised so that V^T (C_xx + a I) V = I, and K = C_yx V V^T,
             the ridge solution K_ridge projected onto them
             (K = K_ridge (C_xx + a I) V V^T).

With a = 0 the inverse is a pseudo-inverse: directions of C_xx whose eigenvalue
is at or below d * eps * the largest are dropped (the Solution says how many, and
the threshold). ``rank=None`` means full rank (pcr and rrr then equal ridge).
Each solver returns a Solution: K, basis (an orthonormal d x r basis of K's row
space, None at full rank: the subspace in which exact DMD reads K's non-zero
spectrum), and the diagnostics `dropped`, `threshold` and `cond`, the condition
number of the part of C_xx + a I that is inverted (what float32 moment products
are amplified by, see dmd.fit).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

SOLVERS = ("ridge", "pcr", "rrr")
ALPHA_MODES = ("relative", "absolute")


class Solution(NamedTuple):
    K: Tensor  # (d, d)
    basis: Optional[Tensor]  # (d, r) orthonormal, or None at full rank
    dropped: int = 0  # directions of C_xx + a I dropped as numerically null
    threshold: float = 0.0  # the eigenvalue at or below which a direction is dropped
    cond: float = 1.0  # largest / smallest eigenvalue of C_xx + a I among those inverted


def ridge_term(cxx: Tensor, alpha: float, alpha_mode: str = "relative") -> float:
    """The ridge a added to C_xx for `alpha` read in `alpha_mode` (module docstring)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if alpha_mode == "absolute":
        return float(alpha)
    if alpha_mode == "relative":
        return float(alpha) * float(torch.trace(cxx)) / cxx.shape[0]
    raise ValueError(f"unknown alpha_mode '{alpha_mode}'; expected one of {', '.join(ALPHA_MODES)}")


class _Spectrum(NamedTuple):
    s: Tensor  # kept eigenvalues of C_xx + a I, largest first
    U: Tensor  # their eigenvectors (d, kept)
    dropped: int
    threshold: float


def _spectrum(cxx: Tensor, alpha: float, alpha_mode: str) -> _Spectrum:
    """Eigen-pairs of C_xx + a I, largest first, numerically null ones dropped."""
    s, U = torch.linalg.eigh(cxx)
    s, U = s.flip(0) + ridge_term(cxx, alpha, alpha_mode), U.flip(1)
    threshold = s[0].clamp_min(0) * cxx.shape[0] * torch.finfo(cxx.dtype).eps
    keep = s > threshold
    return _Spectrum(s[keep], U[:, keep], int((~keep).sum()), float(threshold))


def _cond(s: Tensor) -> float:
    return float(s[0] / s[-1]) if len(s) else float("inf")


def _check_rank(rank: Optional[int], d: int) -> None:
    if rank is not None and not 1 <= rank <= d:
        raise ValueError(f"rank must be in 1..{d} (or None for full rank), got {rank}")


def ridge(cxx: Tensor, cyx: Tensor, alpha: float, alpha_mode: str = "relative") -> Solution:
    sp = _spectrum(cxx, alpha, alpha_mode)
    K = (cyx @ sp.U) / sp.s @ sp.U.T
    return Solution(K, None, sp.dropped, sp.threshold, _cond(sp.s))


def pcr(
    cxx: Tensor, cyx: Tensor, alpha: float, rank: Optional[int], alpha_mode: str = "relative"
) -> Solution:
    _check_rank(rank, cxx.shape[0])
    if rank is None:
        return ridge(cxx, cyx, alpha, alpha_mode)
    sp = _spectrum(cxx, alpha, alpha_mode)
    s, U = sp.s[:rank], sp.U[:, :rank]
    return Solution((cyx @ U) / s @ U.T, U, sp.dropped, sp.threshold, _cond(s))


def rrr(
    cxx: Tensor, cyx: Tensor, alpha: float, rank: Optional[int], alpha_mode: str = "relative"
) -> Solution:
    _check_rank(rank, cxx.shape[0])
    if rank is None:
        return ridge(cxx, cyx, alpha, alpha_mode)
    sp = _spectrum(cxx, alpha, alpha_mode)
    F = sp.U / sp.s.sqrt()  # F^T (C_xx + a I) F = I on the kept directions
    M = cyx @ F
    _, W = torch.linalg.eigh(M.T @ M)  # whitened form of C_xy C_yx v = s^2 (C_xx + a I) v
    V = F @ W.flip(1)[:, :rank]
    K = (cyx @ V) @ V.T
    return Solution(K, torch.linalg.qr(V).Q, sp.dropped, sp.threshold, _cond(sp.s))


def solve(
    cxx: Tensor,
    cyx: Tensor,
    solver: str,
    alpha: float,
    rank: Optional[int],
    alpha_mode: str = "relative",
) -> Solution:
    """Dispatch on the solver name (one of SOLVERS)."""
    if solver == "ridge":
        return ridge(cxx, cyx, alpha, alpha_mode)
    if solver == "pcr":
        return pcr(cxx, cyx, alpha, rank, alpha_mode)
    if solver == "rrr":
        return rrr(cxx, cyx, alpha, rank, alpha_mode)
    raise ValueError(f"unknown DMD solver '{solver}'; expected one of {', '.join(SOLVERS)}")
