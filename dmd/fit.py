"""Fit one operator for a span of layers from streamed moments.

A span (i, p) has cut start i and prune length p (layers i..i+p, 0 <= i,
i + p <= L); K^q x_i predicts x_{i+q}, q = 1..p. Pair selections:

- ``span``: full DMD, every consecutive pair (x_l, x_{l+1}) with i <= l < i + p, pooled;
- ``anchor``: anchored DMD, the single pair (x_i, x_{i+1}), extrapolated by powers;
- ``endpoint``: the unconstrained map x_i -> x_{i+p} (as ReplaceMe fits), stride p;
- ``identity``: K = I, no fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from dmd.moments import MomentAccumulator
from dmd.operator import LinearOperator, identity
from dmd.solvers import solve

SELECTIONS = ("span", "anchor", "endpoint", "identity")


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
        f"unknown pair selection '{selection}'; expected one of {', '.join(SELECTIONS)}"
    )


def fit(
    moments: MomentAccumulator,
    span: Sequence[int],
    selection: str = "span",
    solver: str = "ridge",
    rank: Optional[int] = None,
    alpha: float = 1e-4,
    center: bool = False,
) -> LinearOperator:
    """Fit K for span (i, p) on the selected pairs' moments (dmd.solvers for solver,
    rank, alpha; alpha is relative to the mean eigenvalue of C_xx, rank is ignored
    by ridge). center=True fits y ~ K x + b on centred moments. The fit runs in
    float64 on the moments' device. info["train_mse"] is the fit's mean squared
    error per row on its own pairs, info["train_rel_mse"] that over E||y||^2."""
    i, p = check_span(span, moments.num_layers)
    info = dict(
        selection=selection, solver=solver, span=[i, p], rank=rank, alpha=alpha, center=center
    )
    if selection == "identity":
        return identity(moments.dim, device=moments.device, **dict(info, solver="none", rank=None))
    pm = moments.pair_moments(selection_pairs((i, p), selection))
    fitted = pm.centered() if center else pm
    K, basis = solve(fitted.cxx, fitted.cyx, solver, alpha, rank)
    b = pm.my - K @ pm.mx if center else None
    mse = pm.mse(K, b)
    info.update(train_mse=float(mse), train_rel_mse=float(mse / pm.cyy.trace()))
    stride = p if selection == "endpoint" else 1
    return LinearOperator(K=K, b=b, stride=stride, basis=basis, info=info)


def endpoint_pairs(spans: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The non-consecutive (i, i + p) pairs an endpoint fit of these spans needs."""
    return sorted({(int(i), int(i) + int(p)) for i, p in spans if int(p) > 1})
