"""Fidelity of predicted hidden states, per step and per token group.

`TrajectoryMetrics` is a torchmetrics `Metric`: it streams sufficient
statistics in float64 over batches (and DDP ranks: every state is summed), so
the result equals the computation on all the data concatenated. It is shared
by the DMD evaluation and by Raptor's distillation validation.

Inputs are `pred` and `target` of shape (B, S, T, D): B images, S steps
(step s predicts one layer), T tokens, D features. A *row* is one (image,
token) pair of one step. For every step and every token group (the groups
given plus "all" = every token) `compute()` returns tensors of shape (S,):

- ``r2``: 1 - SSE / SST, SST = sum over feature dims of the target's variance
  over the group's rows (scikit-learn's ``variance_weighted`` R^2);
- ``r2_ref``: the Raptor reference code's variant (overcomplete's
  ``r2_score(pred, target)``): SST is the prediction's own spread around its
  scalar mean over all entries, sum((p - mean(p))^2); computed here over all
  rows at once rather than averaged over batches, and without its 1e-6 epsilon;
- ``r2_affine``: the Raptor paper's regression R^2 (Appendix B.2): per row, the
  target is regressed on the prediction by least squares with a bias over the D
  features (one scale and one shift), and the R^2 of that fit, which is the squared
  Pearson correlation of the two vectors over features (0 when either is constant),
  is averaged over rows; it lies in [0, 1];
- ``cos``: mean over rows of the cosine similarity of pred and target;
- ``rel_l2``: mean over rows of ||pred - target|| / ||target||;
- ``norm_ratio``: mean over rows of ||pred|| / ||target||.

Keys are f"{metric}/{group}" (`metric_key`). A group with no rows gives NaN.

`FidelityTable` holds such results by metric, group and layer, and gives them in the
forms the reports use: logged names, CSV rows, the nested JSON of eval.json.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric

METRICS = ("r2", "r2_ref", "r2_affine", "cos", "rel_l2", "norm_ratio")
_EPS = 1e-12  # floor on norms in the per-row ratios


def metric_key(metric: str, group: str) -> str:
    """The key of one metric of one token group in `TrajectoryMetrics.compute()`."""
    return f"{metric}/{group}"


@dataclass
class FidelityTable:
    """Fidelity results: values[metric][group] = [value per layer of `layers`].

    Metrics and groups keep the order they were computed in (`METRICS`; the groups
    given, then "all"). Build one with `from_metrics` (a `TrajectoryMetrics.compute()`
    result or an evaluation's "fidelity" dict, keyed by `metric_key`) or `from_json`.
    """

    layers: list[int]
    values: dict[str, dict[str, list[float]]]

    @classmethod
    def from_metrics(
        cls, computed: Mapping[str, Sequence[float] | Tensor], layers: Iterable[int]
    ) -> FidelityTable:
        values: dict[str, dict[str, list[float]]] = {}
        for key, per_layer in computed.items():
            metric, _, group = key.partition("/")
            values.setdefault(metric, {})[group] = [float(v) for v in per_layer]
        return cls([int(layer) for layer in layers], values)

    @classmethod
    def from_json(cls, values: Mapping[str, Mapping[str, Sequence]], layers: Iterable[int]):
        """The inverse of `to_json` (eval.json's "student" / "identity" with its "layers")."""
        return cls(
            [int(layer) for layer in layers],
            {m: {g: list(v) for g, v in by_group.items()} for m, by_group in values.items()},
        )

    @property
    def metrics(self) -> list[str]:
        return list(self.values)

    @property
    def groups(self) -> list[str]:
        """The token groups, "all" first, then the others by name (the order of the rows)."""
        names = dict.fromkeys(g for by_group in self.values.values() for g in by_group)
        return sorted(names, key=lambda g: (g != "all", g))

    def get(self, metric: str, group: str = "all") -> list[float]:
        """The values of one metric and group, one per layer of `layers`."""
        return self.values[metric][group]

    def flat(
        self, prefix: str, groups: bool = True, mean: bool = False, tag: str = ""
    ) -> dict[str, float]:
        """Logged names -> values: f"{prefix}/{tag}{metric}/L{layer}" over all tokens and
        f"{prefix}/{tag}{metric}_{group}/L{layer}" per group (only with `groups`);
        with `mean`, f"{prefix}/{tag}{metric}/mean" (all tokens, mean over layers)."""
        out: dict[str, float] = {}
        for metric, by_group in self.values.items():
            for group, per_layer in by_group.items():
                if group != "all" and not groups:
                    continue
                name = f"{tag}{metric}" if group == "all" else f"{tag}{metric}_{group}"
                for layer, v in zip(self.layers, per_layer):
                    out[f"{prefix}/{name}/L{layer}"] = float(v)
                if mean and group == "all":
                    out[f"{prefix}/{name}/mean"] = float(
                        torch.tensor(per_layer, dtype=torch.float64).mean()
                    )
        return out

    def rows(self, group: Optional[str] = None) -> list[dict]:
        """CSV / markdown rows {"layer", "group", every metric}, group by group ("all"
        first), layer by layer; only `group`'s rows when given."""
        return [
            {"layer": layer, "group": g, **{m: self.values[m][g][i] for m in self.values}}
            for g in ([group] if group is not None else self.groups)
            for i, layer in enumerate(self.layers)
        ]

    def to_json(self) -> dict[str, dict[str, list[float]]]:
        """{metric: {group: [value per layer]}}, as eval.json stores it."""
        return {m: {g: list(v) for g, v in by_group.items()} for m, by_group in self.values.items()}

    def aligned(self, layers: Sequence[int]) -> dict[str, dict[str, list[Optional[float]]]]:
        """`to_json` over other `layers`: None where this table has no value."""
        where = {layer: i for i, layer in enumerate(self.layers)}
        return {
            m: {
                g: [float(v[where[layer]]) if layer in where else None for layer in layers]
                for g, v in by_group.items()
            }
            for m, by_group in self.values.items()
        }


class TrajectoryMetrics(Metric):
    """Per-step, per-group fidelity metrics (see the module docstring).

    Args:
        num_steps: S, the size of dim 1 of every update.
        groups: name -> slice over the token axis (e.g. the teacher's
            {"cls": slice(0, 1), "patch": slice(1, None)}); "all" is added.
        dim: D, the feature size; when None the per-dim state is allocated at
            the first update (every DDP rank must then update at least once
            before `compute`).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self, num_steps: int, groups: Mapping[str, slice], dim: Optional[int] = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if num_steps < 1:
            raise ValueError(f"TrajectoryMetrics: num_steps must be >= 1, got {num_steps}")
        if "all" in groups:
            raise ValueError("TrajectoryMetrics: the group name 'all' is reserved (every token)")
        for name, sl in groups.items():
            if not isinstance(sl, slice):
                raise TypeError(
                    f"TrajectoryMetrics: group '{name}' must be a slice, got {type(sl).__name__}"
                )
        self.num_steps = int(num_steps)
        self.group_names = list(groups) + ["all"]
        self.slices = list(groups.values()) + [slice(None)]
        G, S = len(self.group_names), self.num_steps
        f64 = torch.float64
        sums = ("sse", "sum_y2", "sum_p", "sum_p2", "sum_r2a", "sum_cos", "sum_rel", "sum_ratio")
        for name in ("rows",) + sums:
            self.add_state(name, default=torch.zeros(G, S, dtype=f64), dist_reduce_fx="sum")
        self.add_state(
            "sum_y", default=torch.zeros(G, S, dim or 0, dtype=f64), dist_reduce_fx="sum"
        )

    def update(self, pred: Tensor, target: Tensor, valid: Optional[Tensor] = None) -> None:
        """Add a batch: pred, target (B, S, T, D); valid bool (B,) marks rows to keep."""
        if pred.shape != target.shape or pred.ndim != 4:
            raise ValueError(
                f"TrajectoryMetrics: pred and target must both be (B, S, T, D), got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if pred.shape[1] != self.num_steps:
            raise ValueError(
                f"TrajectoryMetrics: expected {self.num_steps} steps on dim 1, got {pred.shape[1]}"
            )
        if valid is not None:
            if valid.shape != pred.shape[:1]:
                raise ValueError(
                    f"TrajectoryMetrics: valid must be bool ({pred.shape[0]},), got {tuple(valid.shape)}"
                )
            valid = valid.to(device=pred.device, dtype=torch.bool)
            pred, target = pred[valid], target[valid]
        D = pred.shape[-1]
        if self.sum_y.shape[-1] == 0:
            self.sum_y = torch.zeros(
                *self.sum_y.shape[:2], D, dtype=torch.float64, device=self.device
            )
        elif self.sum_y.shape[-1] != D:
            raise ValueError(
                f"TrajectoryMetrics: feature size {D} != {self.sum_y.shape[-1]} seen before"
            )
        for s in range(self.num_steps):  # one step at a time bounds the float64 copies
            p = pred[:, s].to(torch.float64)
            y = target[:, s].to(torch.float64)
            e2 = (p - y).square().sum(-1)  # (B, T)
            p2, y2, py = p.square().sum(-1), y.square().sum(-1), (p * y).sum(-1)
            pn, yn = p2.sqrt(), y2.sqrt().clamp_min(_EPS)
            pc, yc = p - p.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
            spread = pc.square().sum(-1) * yc.square().sum(-1)
            r2a = (pc * yc).sum(-1).square() / spread.clamp_min(torch.finfo(spread.dtype).tiny)
            per_row = {
                "sse": e2,
                "sum_y2": y2,
                "sum_p": p.sum(-1),
                "sum_p2": p2,
                "sum_r2a": torch.where(spread > 0, r2a, torch.zeros_like(r2a)),
                "sum_cos": py / (pn * yn).clamp_min(_EPS),
                "sum_rel": e2.sqrt() / yn,
                "sum_ratio": pn / yn,
            }
            y_tok = y.sum(0)  # (T, D)
            for g, sl in enumerate(self.slices):
                for name, val in per_row.items():
                    getattr(self, name)[g, s] += val[:, sl].sum()
                self.rows[g, s] += e2[:, sl].numel()
                self.sum_y[g, s] += y_tok[sl].sum(0)

    def _wrap_compute(self, compute):
        """torchmetrics squeezes one-element results to 0-d; keep every value (S,)."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(wrapped)
        def shaped(*args, **kwargs):
            return {k: v.reshape(-1) for k, v in wrapped(*args, **kwargs).items()}

        return shaped

    def compute(self) -> dict[str, Tensor]:
        rows = self.rows
        sst = self.sum_y2 - self.sum_y.square().sum(-1) / rows
        entries = rows * self.sum_y.shape[-1]
        sst_ref = self.sum_p2 - self.sum_p.square() / entries
        values = {
            "r2": 1.0 - self.sse / sst,
            "r2_ref": 1.0 - self.sse / sst_ref,
            "r2_affine": self.sum_r2a / rows,
            "cos": self.sum_cos / rows,
            "rel_l2": self.sum_rel / rows,
            "norm_ratio": self.sum_ratio / rows,
        }
        out = {}
        for metric in METRICS:
            for g, group in enumerate(self.group_names):
                v = values[metric][g]
                out[metric_key(metric, group)] = torch.where(
                    rows[g] > 0, v, torch.full_like(v, float("nan"))
                )
        return out

    def table(self, layers: Iterable[int]) -> FidelityTable:
        """`compute()` as a table over `layers` (one per step)."""
        return FidelityTable.from_metrics(self.compute(), layers)


def trajectory_metrics(
    pred: Tensor, target: Tensor, groups: Mapping[str, slice], valid: Optional[Tensor] = None
) -> dict[str, Tensor]:
    """One-shot `TrajectoryMetrics` on pred, target (B, S, T, D); values (S,) float64."""
    metric = TrajectoryMetrics(pred.shape[1], groups, dim=pred.shape[-1]).to(pred.device)
    metric.update(pred, target, valid)
    return metric.compute()
