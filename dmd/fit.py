"""Fit one operator for a span of layers from streamed moments.

A span (i, p) has cut start i and prune length p (layers i..i+p, 0 <= i,
i + p <= L); K^q x_i predicts x_{i+q}, q = 1..p. Pair selections:

- ``span``: full DMD, every consecutive pair (x_l, x_{l+1}) with i <= l < i + p, pooled;
- ``anchor``: anchored DMD, the single pair (x_i, x_{i+1}), extrapolated by powers;
- ``endpoint``: the unconstrained map x_i -> x_{i+p}, stride p;
- ``replaceme``: ReplaceMe (Shopkhoev et al., 2025): blocks i+1..i+p removed and a
  linear map T applied to the MLP output m_i of block i, the block that ends at the
  cut, whose residual stream y_i = x_i - m_i carries on: x_{i+p} ~ y_i + K m_i
  (K = T^T in the column convention), fitted by least squares on
  (m_i, x_{i+p} - y_i). It needs i >= 1 (a block before the cut) and the
  blocks' MLP outputs (`MomentAccumulator(mlp_spans=...)`); stride p;
- ``identity``: K = I, no fit.

Warnings (`DMDFitWarning`): a fit whose pseudo-inverse dropped numerically null
directions of C_xx (alpha = 0), and a fit from float32 moment products whose
inverted C_xx + a I has a condition number kappa with eps_float32 * kappa >
FLOAT32_ERROR. Rounding the products perturbs C_xx by about eps_float32 relative,
and the solve amplifies a relative perturbation of C_xx by up to kappa in K. On
ViT-like trajectories (`vit_like` in tests/test_dmd_moments_precision.py, 64 images,
d = 128, L = 3; uncentred Gram of condition number 5e9) the relative error of K from
float32 products, each block's partial sum added into float64, was 2e-3 to 6e-3
at eps_float32 * kappa = 0.15 (relative alpha 1e-4), 1e-2 to 4e-2 at 1.5
(relative 1e-5) and 0.18 to 0.33 at 110 (alpha = 0), while the predictions K x moved
by at most 2e-4 relative; above FLOAT32_ERROR = 1, K may be off by a few percent
or more.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

import torch

from dmd.moments import MomentAccumulator
from dmd.operator import LinearOperator, identity
from dmd.solvers import solve

SELECTIONS = ("span", "anchor", "endpoint", "replaceme", "identity")
# selections whose K is not a step along depth (no DMD spectrum is read from it)
NO_SPECTRUM = ("identity", "replaceme")
FLOAT32_ERROR = 1.0  # eps_float32 * kappa above which a float32-moment fit warns


class DMDFitWarning(UserWarning):
    """A DMD fit that dropped directions or may have lost its accuracy to float32."""


def check_span(span: Sequence[int], num_layers: int) -> tuple[int, int]:
    """(i, p) as ints, or one clear error."""
    if len(span) != 2:
        raise ValueError(f"a span is (cut start i, prune length p), got {list(span)}")
    i, p = int(span[0]), int(span[1])
    if i < 0 or p < 1 or i + p > num_layers:
        raise ValueError(
            f"span (i={i}, p={p}) must satisfy 0 <= i, p >= 1, i + p <= L = {num_layers}"
        )
    return i, p


def fits_span(selection: str, span: Sequence[int]) -> bool:
    """Whether a selection can be fitted on a span (ReplaceMe needs a block before the cut)."""
    return selection != "replaceme" or int(span[0]) >= 1


def selection_pairs(span: Sequence[int], selection: str) -> list[tuple[int, int]]:
    """The (input layer, output layer) pairs a selection fits on."""
    i, p = int(span[0]), int(span[1])
    if selection == "span":
        return [(j, j + 1) for j in range(i, i + p)]
    if selection == "anchor":
        return [(i, i + 1)]
    if selection == "endpoint":
        return [(i, i + p)]
    raise ValueError(
        f"unknown pair selection '{selection}'; expected one of "
        f"{', '.join(s for s in SELECTIONS if s not in ('replaceme', 'identity'))}"
    )


def fit(
    moments: MomentAccumulator,
    span: Sequence[int],
    selection: str = "span",
    solver: str = "ridge",
    rank: Optional[int] = None,
    alpha: float = 1e-4,
    center: bool = False,
    alpha_mode: str = "relative",
) -> LinearOperator:
    """Fit K for span (i, p) on the selected pairs' moments (dmd.solvers for solver,
    rank, alpha, alpha_mode; rank is ignored by ridge). center=True fits y ~ K x + b
    on centred moments. The fit runs in float64 on the moments' device.
    info["train_mse"] is the fit's mean squared error per row on its own pairs,
    info["train_rel_mse"] that over E||y||^2; info["dropped"], ["threshold"] and
    ["cond"] are the solver's diagnostics (module docstring for the warnings)."""
    i, p = check_span(span, moments.num_layers)
    info = dict(
        selection=selection,
        solver=solver,
        span=[i, p],
        rank=rank,
        alpha=alpha,
        alpha_mode=alpha_mode,
        center=center,
    )
    if selection == "identity":
        return identity(moments.dim, device=moments.device, **dict(info, solver="none", rank=None))
    if selection == "replaceme":
        if not fits_span(selection, (i, p)):
            raise ValueError(
                f"replaceme: span (i={i}, p={p}) has no block before its cut whose MLP output "
                "the map could read; ReplaceMe needs i >= 1"
            )
        pm = moments.replaceme_moments((i, p))
    else:
        pm = moments.pair_moments(selection_pairs((i, p), selection))
    fitted = pm.centered() if center else pm
    sol = solve(fitted.cxx, fitted.cyx, solver, alpha, rank, alpha_mode)
    K = sol.K
    b = pm.my - K @ pm.mx if center else None
    mse = pm.mse(K, b)
    info.update(
        train_mse=float(mse),
        train_rel_mse=float(mse / pm.cyy.trace()),
        dropped=sol.dropped,
        threshold=sol.threshold,
        cond=sol.cond,
    )
    _warn(info, moments.compute_dtype)
    stride = 1 if selection in ("span", "anchor") else p
    return LinearOperator(
        K=K, b=b, stride=stride, basis=sol.basis, info=info, mlp_input=selection == "replaceme"
    )


def _warn(info: dict, compute_dtype: torch.dtype) -> None:
    """The fit's DMDFitWarnings (module docstring)."""
    what = (
        f"DMD fit {info['selection']}/{info['solver']} of span {tuple(info['span'])} "
        f"(alpha={info['alpha']:g} {info['alpha_mode']})"
    )
    if info["dropped"]:
        warnings.warn(
            f"{what}: the pseudo-inverse dropped {info['dropped']} direction(s) of C_xx + a I "
            f"with eigenvalue <= {info['threshold']:.3g} (d * eps * the largest); K is zero on "
            "them. Set alpha > 0 to keep every direction.",
            DMDFitWarning,
            stacklevel=3,
        )
    eps32 = torch.finfo(torch.float32).eps
    if compute_dtype == torch.float32 and eps32 * info["cond"] > FLOAT32_ERROR:
        warnings.warn(
            f"{what}: moments from float32 products with condition number {info['cond']:.3g} "
            f"of C_xx + a I (eps_float32 * kappa = {eps32 * info['cond']:.3g} > "
            f"{FLOAT32_ERROR}): K may be off by several percent or more. Use "
            "compute_dtype=float64 or a larger alpha.",
            DMDFitWarning,
            stacklevel=3,
        )


def endpoint_pairs(spans: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The non-consecutive (i, i + p) pairs an endpoint fit of these spans needs."""
    return sorted({(int(i), int(i) + int(p)) for i, p in spans if int(p) > 1})
