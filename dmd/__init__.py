"""DMD along depth: streamed second moments, closed-form linear operators, fidelity metrics.

A library of its own (tensors in, operators and metrics out); it imports nothing
from `raptor`. Conventions: a trajectory is (B, L+1, T, D), layer 0 the tokens
entering block 1; tokens are rows; an operator maps column vectors, y ~ K x.
"""

from dmd.fit import SELECTIONS, fit, selection_pairs
from dmd.metrics import METRICS, FidelityTable, TrajectoryMetrics, trajectory_metrics
from dmd.moments import MomentAccumulator, PairMoments
from dmd.operator import LinearOperator, identity
from dmd.solvers import SOLVERS

__all__ = [
    "METRICS",
    "SELECTIONS",
    "SOLVERS",
    "FidelityTable",
    "LinearOperator",
    "MomentAccumulator",
    "PairMoments",
    "TrajectoryMetrics",
    "fit",
    "identity",
    "selection_pairs",
    "trajectory_metrics",
]
