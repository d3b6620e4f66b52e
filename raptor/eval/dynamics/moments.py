"""Streamed mean and standard deviation of per-layer values, exact over any chunking."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor


class Moments:
    """Sum, sum of squares and count of rows (N, n) in float64; NaN where no row came."""

    def __init__(self, n: int) -> None:
        self.total = torch.zeros(n, dtype=torch.float64)
        self.squares = torch.zeros(n, dtype=torch.float64)
        self.count = 0

    def update(self, values: Tensor) -> None:
        """values (N, n): N observations of the n quantities."""
        v = values.detach().to("cpu", torch.float64)
        self.total += v.sum(0)
        self.squares += (v * v).sum(0)
        self.count += v.shape[0]

    def mean(self) -> Tensor:
        return self.total / self.count if self.count else torch.full_like(self.total, float("nan"))

    def std(self) -> Tensor:
        if not self.count:
            return torch.full_like(self.total, float("nan"))
        var = self.squares / self.count - self.mean() ** 2
        return var.clamp_min(0).sqrt()

    def to_json(self) -> Dict[str, List[float]]:
        return {"mean": self.mean().tolist(), "std": self.std().tolist()}
