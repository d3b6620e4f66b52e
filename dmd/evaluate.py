"""Evaluate fitted operators on held-out trajectories, streamed batch by batch.

An *entry* is a named predictor made of one or more parts (span (i, p),
operator); each part predicts from the true x_i the layers i+1..i+p (stride-1
operators) or the single layer i+p (an endpoint or ReplaceMe map, stride p; a
ReplaceMe map also reads block i's MLP output, so `update` then needs the blocks'
MLP outputs: `needs_mlp`). The layers of
an entry's parts must be distinct; they are its metric steps, in part order.

Per entry, `TrajectoryMetrics` over its layers and, with `finish` given,
downstream numbers per part: the predicted x_{i+p} run through the teacher's
remaining blocks (`finish(a, from_layer) -> {"tokens": (B, T, D) final-normed,
"logits": (B, C) or None}`) and compared with the teacher's own final tokens
(same metrics, one step per part), and top-1 of its logits against the labels
(rows with label >= 0) and against the teacher's own top-1 (`agree`).
Every state is a torchmetrics state, so results are synced over DDP ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from dmd.fit import fit, fits_span
from dmd.metrics import TrajectoryMetrics
from dmd.moments import MomentAccumulator
from dmd.operator import LinearOperator

Finish = Callable[[Tensor, int], Mapping[str, Optional[Tensor]]]


@dataclass
class Entry:
    """A named predictor: parts [((i, p), operator), ...]; meta is copied to reports."""

    name: str
    parts: list[tuple[tuple[int, int], LinearOperator]]
    downstream: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def part_layers(self, part: int) -> list[int]:
        (i, p), op = self.parts[part]
        return list(range(i + op.stride, i + p + 1, op.stride))

    @property
    def layers(self) -> list[int]:
        layers = [layer for j in range(len(self.parts)) for layer in self.part_layers(j)]
        if len(set(layers)) != len(layers):
            raise ValueError(
                f"DMD entry '{self.name}': its spans predict layer(s) more than once: {layers}"
            )
        return layers

    @property
    def needs_mlp(self) -> bool:
        return any(op.mlp_input for _, op in self.parts)

    def predict(self, traj: Tensor, mlp: Optional[Tensor] = None) -> Tensor:
        """traj (B, L+1, T, D) (and mlp (B, L, T, D), block l at l - 1, for ReplaceMe parts)
        -> predictions (B, len(layers), T, D), float32 or wider."""
        out = []
        for (i, p), op in self.parts:
            steps = p // op.stride
            if op.mlp_input and mlp is None:
                raise ValueError(f"DMD entry '{self.name}': a ReplaceMe part needs mlp outputs")
            m = mlp[:, i - 1] if op.mlp_input else None
            out.append(op.predict(traj[:, i], steps, m).transpose(1, 2))  # (B, steps, T, D)
        return torch.cat(out, dim=1)


class TopOne(Metric):
    """Top-1 counts per part: correct vs labels, agreement with the teacher's top-1."""

    full_state_update = False

    def __init__(self, parts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("correct", "agree"):
            self.add_state(
                name, default=torch.zeros(parts, dtype=torch.float64), dist_reduce_fx="sum"
            )
        for name in ("labelled", "total"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, teacher: Tensor, labels: Tensor) -> None:
        """pred (B, parts) and teacher (B,) class indices; labels (B,) (-1: none)."""
        has = labels >= 0
        self.correct += (pred[has] == labels[has, None]).sum(0)
        self.agree += (pred == teacher[:, None]).sum(0)
        self.labelled += has.sum()
        self.total += pred.shape[0]

    def compute(self) -> dict[str, Tensor]:
        nan = torch.full_like(self.correct, float("nan"))
        acc = self.correct / self.labelled if self.labelled > 0 else nan
        agree = self.agree / self.total if self.total > 0 else nan
        return {"top1": acc, "agree": agree}


class Evaluator(nn.Module):
    """Streams `update(traj, valid, labels)` for every entry; `compute()` -> results.

    Args:
        entries: the predictors.
        groups: token-group slices (for TrajectoryMetrics; "all" is added).
        finish: the teacher's tail, for downstream metrics of entries with
            downstream=True; None skips them.
        top1: whether `finish` returns logits (the teacher has a head).
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        groups: Mapping[str, slice],
        finish: Optional[Finish] = None,
        top1: bool = False,
    ):
        super().__init__()
        names = [e.name for e in entries]
        if not entries or len(set(names)) != len(names):
            raise ValueError(f"DMD evaluation needs entries with distinct names, got {names}")
        self.entries = list(entries)
        self._keys = {id(e): f"entry{k}" for k, e in enumerate(self.entries)}  # names may hold dots
        self.finish = finish
        D = entries[0].parts[0][1].dim
        self.fidelity = nn.ModuleDict(
            {self._key(e): TrajectoryMetrics(len(e.layers), groups, dim=D) for e in entries}
        )
        self.final = nn.ModuleDict()
        self.top1 = nn.ModuleDict()
        if finish is not None:
            for e in entries:
                if e.downstream:
                    self.final[self._key(e)] = TrajectoryMetrics(len(e.parts), groups, dim=D)
                    if top1:
                        self.top1[self._key(e)] = TopOne(len(e.parts))

    def _key(self, entry: Entry) -> str:
        return self._keys[id(entry)]

    @property
    def needs_mlp(self) -> bool:
        """Whether `update` needs the blocks' MLP outputs (a ReplaceMe entry)."""
        return any(e.needs_mlp for e in self.entries)

    @torch.no_grad()
    def update(
        self,
        traj: Tensor,
        valid: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        mlp: Optional[Tensor] = None,
    ) -> None:
        """traj (B, L+1, T, D); valid bool (B,); labels long (B,) or None; mlp (B, L, T, D)
        the blocks' MLP outputs (needed when `needs_mlp`)."""
        if valid is not None:
            keep = valid.to(device=traj.device, dtype=torch.bool)
            traj = traj[keep]
            labels = None if labels is None else labels.to(traj.device)[keep]
            mlp = None if mlp is None else mlp[keep.to(mlp.device)]
        if traj.shape[0] == 0:
            return
        if self.finish is not None and len(self.final):
            L = traj.shape[1] - 1
            ref = self.finish(traj[:, L], L)
            if len(self.top1) and ref.get("logits") is None:
                raise ValueError("DMD evaluation: top1=True but finish() returned no logits")
        for e in self.entries:  # one entry at a time: one prediction held in memory
            pred = e.predict(traj, mlp)
            self.fidelity[self._key(e)].update(
                pred, traj[:, torch.tensor(e.layers, device=traj.device)]
            )
            if self._key(e) in self.final:
                self._downstream(e, pred, ref, labels)

    def _downstream(
        self, e: Entry, pred: Tensor, ref: Mapping[str, Any], labels: Optional[Tensor]
    ) -> None:
        """Each span end's prediction finished by the teacher vs the teacher's own output."""
        tokens, classes = [], []
        for (i, p), _ in e.parts:
            out = self.finish(pred[:, e.layers.index(i + p)].float(), i + p)
            tokens.append(out["tokens"].float())
            if self._key(e) in self.top1:
                classes.append(out["logits"].argmax(-1))
        ref_tokens = ref["tokens"].float()[:, None].expand(-1, len(tokens), -1, -1)
        self.final[self._key(e)].update(torch.stack(tokens, 1), ref_tokens)
        if classes:
            lab = labels if labels is not None else torch.full_like(classes[0], -1)
            self.top1[self._key(e)].update(torch.stack(classes, 1), ref["logits"].argmax(-1), lab)

    def compute(self) -> dict[str, dict[str, Any]]:
        """{entry: {"layers": [...], "fidelity": {metric/group: [per layer]},
        "spans": [[i, p], ...], "final": {metric/group: [per part]} or None,
        "top1": [per part] or None, "agree": [per part] or None, "meta": ...}}."""
        out = {}
        for e in self.entries:
            res: dict[str, Any] = {
                "layers": e.layers,
                "spans": [list(span) for span, _ in e.parts],
                "fidelity": _lists(self.fidelity[self._key(e)].compute()),
                "final": None,
                "top1": None,
                "agree": None,
                "meta": dict(e.meta),
            }
            if self._key(e) in self.final:
                res["final"] = _lists(self.final[self._key(e)].compute())
            if self._key(e) in self.top1:
                top = _lists(self.top1[self._key(e)].compute())
                res["top1"], res["agree"] = top["top1"], top["agree"]
            out[e.name] = res
        return out

    def reset(self) -> None:
        for m in (
            list(self.fidelity.values()) + list(self.final.values()) + list(self.top1.values())
        ):
            m.reset()


def _lists(values: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Tensors -> lists of floats (one-element results come back 0-d from torchmetrics)."""
    return {k: [float(x) for x in v.reshape(-1)] for k, v in values.items()}


def fit_entries(
    moments: MomentAccumulator,
    spans: Sequence[Sequence[int]],
    solvers: Sequence[str],
    selections: Sequence[str],
    rank: Optional[int] = None,
    alpha: float = 1e-4,
    center: bool = False,
    joint: bool = True,
    alpha_mode: str = "relative",
) -> list[Entry]:
    """Fit every (selection, solver) variant on every span (identity once, no solver);
    a selection skips the spans it cannot fit (`dmd.fit.fits_span`: ReplaceMe at i = 0).

    joint=True: one entry per variant holding all spans as parts, named by the
    variant ("span_rrr", "endpoint_ridge", "identity"), e.g. one span per phase;
    joint=False: one entry per (variant, span), named f"{variant}@{i},{p}"."""
    variants = []
    for sel in selections:
        if sel == "identity":
            variants.append(("identity", sel, "none"))
        else:
            variants += [(f"{sel}_{solver}", sel, solver) for solver in solvers]
    entries = []
    for name, sel, solver in variants:
        parts = [
            (
                (int(i), int(p)),
                fit(moments, (i, p), sel, solver, rank, alpha, center, alpha_mode),
            )
            for i, p in spans
            if fits_span(sel, (i, p))
        ]
        meta = dict(
            variant=name,
            selection=sel,
            solver=solver,
            rank=rank,
            alpha=alpha,
            alpha_mode=alpha_mode,
            center=center,
        )
        if not parts:
            continue
        if joint:
            entries.append(Entry(name, parts, meta=meta))
        else:
            for span, op in parts:
                entries.append(
                    Entry(f"{name}@{span[0]},{span[1]}", [(span, op)], meta=dict(meta, **op.info))
                )
    return entries
