"""Probe tasks: what is read from a backbone's tokens, the head trained on it, its loss and
its metrics (the interface the runner `raptor.eval.probe.run` drives, the same for every
task).

`TASKS` maps a task name to its factory `make(num_classes: int, dense) -> ProbeTask`, with
`num_classes` the labels' classes (cls: the teacher's head, else the shards' manifest;
seg: the manifest's `dense.seg.classes`) and `dense` the `probe.dense` config section
(the seg / depth heads, `raptor.eval.probe.dense`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raptor.eval.probe.dense import DepthTask, SegTask


class ProbeMetrics(Protocol):
    def update(self, out: Tensor, target: Tensor) -> None: ...

    def compute(self) -> Dict[str, float]: ...


class ProbeTask(Protocol):
    name: str  # "cls" | "seg" | "depth"
    target_key: str  # the batch key of the target: "label" (cls) | "target" (dense)
    primary: str  # the metric the best epoch is chosen by
    higher_is_better: bool

    def select(self, tokens: Tensor, groups: Dict[str, slice]) -> Tensor:
        """One layer's tokens (n, T, D) -> what is cached and fed to the head."""

    def head(self, dim: int, grid: Optional[tuple[int, int]]) -> nn.Module:
        """A fresh trainable head on select()'s output (float32)."""

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        """Scalar loss of the head's output against the target."""

    def metrics(self) -> ProbeMetrics:
        """Fresh metric state: update(out, target), compute() -> {name: value}."""


# How the Raptor paper fine-tunes each task's probe (Appendix B.3, Table 6: ImageNet-1k,
# ADE20k, NYUv2): the defaults of probe.epochs, probe.batch_size and probe.lr. The three share
# AdamW with weight decay 1e-2, 100 warmup iterations then cosine decay, and the gradient norm
# clipped at 1.0 (probe.weight_decay, probe.warmup_steps, probe.grad_clip's defaults).
PAPER_TRAINING: Dict[str, Dict[str, Any]] = {
    "cls": {"epochs": 15, "batch_size": 512, "lr": 1e-3},
    "seg": {"epochs": 10, "batch_size": 32, "lr": 1e-3},
    "depth": {"epochs": 25, "batch_size": 128, "lr": 1e-4},
}

NO_LABEL = -1  # a classification sample without a label (`raptor.data.stream`)


class Top1:
    """Top-1 accuracy over labelled samples (a label of -1 is not counted)."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, out: Tensor, target: Tensor) -> None:
        seen = target != NO_LABEL
        self.correct += int((out.argmax(dim=-1)[seen] == target[seen]).sum())
        self.total += int(seen.sum())

    def compute(self) -> Dict[str, float]:
        return {"top1": self.correct / self.total if self.total else float("nan")}


class ClsTask:
    """Classification (the Raptor paper's ImageNet protocol, Appendix B.3): a linear head
    on [cls ; mean(patch)] (n, 2D) of one layer's tokens, cross-entropy, top-1."""

    name = "cls"
    target_key = "label"
    primary = "top1"
    higher_is_better = True

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)

    @classmethod
    def from_config(cls, num_classes: int, dense: Any = None) -> ClsTask:
        """The TASKS factory (the dense section is not used)."""
        return cls(num_classes)

    def select(self, tokens: Tensor, groups: Dict[str, slice]) -> Tensor:
        cls = tokens[:, groups["cls"]].mean(dim=1)  # the one cls token
        return torch.cat([cls, tokens[:, groups["patch"]].mean(dim=1)], dim=-1)

    def head(self, dim: int, grid: Optional[tuple[int, int]] = None) -> nn.Module:
        return nn.Linear(dim, self.num_classes)

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(out, target, ignore_index=NO_LABEL)

    def metrics(self) -> Top1:
        return Top1()


TASKS: Dict[str, Callable[[int, Any], ProbeTask]] = {
    "cls": ClsTask.from_config,
    "seg": SegTask.from_config,
    "depth": DepthTask.from_config,
}
