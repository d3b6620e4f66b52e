"""Sweeps over one fitting choice at a time around a base fit.

Each sweep varies one thing and keeps the base fit's other choices:

- ``rank``: every rank, for each rank-aware solver (pcr, rrr) among the solvers;
- ``alpha``: every alpha, for each solver;
- ``budget``: calibration images B, from the moments of the first B images of one
  stream (`BudgetMoments`: each image accumulated once, into the stretch between
  two budgets; the stretches summed at the end); the error at the span end is
  fitted by least squares in log-log space, error(B) = C / B^gamma (`power_law`);
- ``cut_start``: span (i, p_base) for every i, each selection that can fit it
  (`dmd.fit.fits_span`: no ReplaceMe at i = 0);
- ``prune_length``: span (i_base, p) for every p, each selection;
- ``token_group``: the base fit on one token group's rows only, scored on that group.

A sweep's score is read at the span's last layer i + p (`score`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from dmd.fit import fits_span
from dmd.metrics import METRICS, metric_key
from dmd.moments import MomentAccumulator

RANK_SOLVERS = ("pcr", "rrr")
SWEEPS = ("rank", "alpha", "budget", "cut_start", "prune_length", "token_group")


@dataclass(frozen=True)
class FitSpec:
    """Everything that defines one fit (and which moments it reads)."""

    span: tuple[int, int]
    selection: str = "span"
    solver: str = "ridge"
    rank: Optional[int] = None
    alpha: float = 1e-4
    center: bool = False
    alpha_mode: str = "relative"
    budget: Optional[int] = None  # calibration images; None = all
    group: str = "all"  # token rows fitted on

    @property
    def variant(self) -> str:
        return "identity" if self.selection == "identity" else f"{self.selection}_{self.solver}"

    def fit_kwargs(self) -> dict[str, Any]:
        return dict(
            span=self.span,
            selection=self.selection,
            solver=self.solver,
            rank=self.rank,
            alpha=self.alpha,
            center=self.center,
            alpha_mode=self.alpha_mode,
        )


@dataclass(frozen=True)
class SweepPoint:
    sweep: str
    value: Any
    spec: FitSpec

    @property
    def name(self) -> str:
        return f"sweep/{self.sweep}={self.value}/{self.spec.variant}"


def plan_sweeps(
    base: FitSpec,
    solvers: Sequence[str],
    selections: Sequence[str],
    ranks: Sequence[int] = (),
    alphas: Sequence[float] = (),
    budgets: Sequence[int] = (),
    cut_starts: Sequence[int] = (),
    prune_lengths: Sequence[int] = (),
    token_groups: Sequence[str] = (),
) -> list[SweepPoint]:
    """The fits of every requested sweep (empty sequences skip a sweep)."""
    points = []
    rank_solvers = [s for s in solvers if s in RANK_SOLVERS] or ["rrr"]
    fitted = [s for s in selections if s != "identity"]
    for solver in rank_solvers:
        points += [SweepPoint("rank", r, replace(base, solver=solver, rank=int(r))) for r in ranks]
    for solver in solvers:
        points += [
            SweepPoint("alpha", float(a), replace(base, solver=solver, alpha=float(a)))
            for a in alphas
        ]
    points += [SweepPoint("budget", int(b), replace(base, budget=int(b))) for b in sorted(budgets)]
    i0, p0 = base.span
    for sweep, spans in (
        ("cut_start", [(int(i), p0) for i in cut_starts]),
        ("prune_length", [(i0, int(p)) for p in prune_lengths]),
    ):
        for span in spans:
            value = span[0] if sweep == "cut_start" else span[1]
            for sel in fitted + (["identity"] if "identity" in selections else []):
                if fits_span(sel, span):
                    points.append(SweepPoint(sweep, value, replace(base, span=span, selection=sel)))
    points += [SweepPoint("token_group", g, replace(base, group=g)) for g in token_groups]
    return points


class BudgetMoments:
    """The moments of the first B images of a stream for several budgets B at once.

    `stops`: the budgets in images (the largest: all the stream gives); `make()`: a new
    empty accumulator. Each image goes into one accumulator, that of the stretch
    (previous stop, stop] it falls in; `totals` sums the stretches in place into the
    moments of every budget, so memory is one set of moments per budget and no
    image is accumulated twice.
    """

    def __init__(self, stops: Sequence[int], make: Callable[[], MomentAccumulator]) -> None:
        self.stops = sorted({int(s) for s in stops})
        self.parts = [make() for _ in self.stops]
        self.images = 0

    def update(self, trajectory: Tensor, valid: Tensor, mlp: Optional[Tensor] = None) -> None:
        """Add a batch (`MomentAccumulator.update`); images after the last stop are left out."""
        count = self.images + torch.cumsum(valid.long(), 0)
        low = 0
        for stop, part in zip(self.stops, self.parts):
            piece = valid & (count > low) & (count <= stop)
            if piece.any():
                part.update(trajectory, piece, mlp)
            low = stop
        self.images = min(int(count[-1]), self.stops[-1])

    def totals(self, group=None) -> dict[int, MomentAccumulator]:
        """{stop: the moments of the first `stop` images}, merged over DDP ranks (every
        rank calls it); a rank whose stream ended early gives all it had."""
        for part in self.parts:
            part.all_reduce(group)
        for before, part in zip(self.parts, self.parts[1:]):
            part.add_(before)
        return dict(zip(self.stops, self.parts))


def score(result: Mapping[str, Any], layer: int, group: str = "all") -> dict[str, float]:
    """Every metric of an evaluation result (dmd.evaluate) at one layer, for one group."""
    idx = result["layers"].index(layer)
    return {m: result["fidelity"][metric_key(m, group)][idx] for m in METRICS}


def power_law(budgets: Sequence[float], errors: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of log error = log C - gamma log B: {"C", "gamma", "r2_log"}."""
    B, e = np.asarray(budgets, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    ok = np.isfinite(e) & (e > 0) & (B > 0)
    if len(np.unique(B[ok])) < 2:
        raise ValueError("power_law: need positive errors at two or more distinct budgets")
    x, y = np.log(B[ok]), np.log(e[ok])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    sst = ((y - y.mean()) ** 2).sum()
    return {
        "C": float(np.exp(intercept)),
        "gamma": float(-slope),
        "r2_log": float(1 - (resid**2).sum() / sst) if sst > 0 else 1.0,
    }


def sweep_rows(
    points: Sequence[SweepPoint], results: Mapping[str, Mapping[str, Any]]
) -> dict[str, list[dict]]:
    """One table per sweep: the point's settings and its score at the span end."""
    tables: dict[str, list[dict]] = {}
    for pt in points:
        spec, res = pt.spec, results[pt.name]
        i, p = spec.span
        row = {
            "sweep": pt.sweep,
            "value": pt.value,
            "variant": spec.variant,
            "i": i,
            "p": p,
            "layer": i + p,
            "selection": spec.selection,
            "solver": spec.solver if spec.selection != "identity" else "",
            "rank": spec.rank,
            "alpha": spec.alpha,
            "alpha_mode": spec.alpha_mode,
            "budget": spec.budget,
            "group": spec.group,
            "train_rel_mse": res["meta"].get("train_rel_mse"),
        }
        row.update(score(res, i + p, spec.group))
        tables.setdefault(pt.sweep, []).append(row)
    return tables
