"""DMD along depth: streamed second moments, closed-form linear operators, fidelity metrics.

A library of its own (tensors in, operators and metrics out); it imports nothing
from `raptor`.
"""

from dmd.metrics import METRICS, TrajectoryMetrics, trajectory_metrics

__all__ = ["METRICS", "TrajectoryMetrics", "trajectory_metrics"]
