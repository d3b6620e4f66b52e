"""Batches of images through a teacher: the trajectories every consumer reads.

`through_teacher` runs one batch; `stream_trajectories` runs a loader's batches in
order, stopping after an image budget (this process's share of a budget over
several ranks). Batches are dicts with "image" (B, C, H, W) and optionally "valid"
bool (B,) (rows to use; all when absent) and "label" long (B,). The teacher is any
callable images -> trajectory (B, L+1, T, D) (or fewer layers); it runs without
gradients on `device`, with whatever precision it applies itself. With
`mlp_out=True` it is called as `trajectory(images, mlp_out=True)` and returns
(trajectory, mlp) with mlp (B, L, T, D) the MLP output of every block (block l at
index l - 1, what it adds to the residual stream after its attention), and each
batch is a `TrajectoryMLPBatch` (the same fields and `mlp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple, Optional

import torch
from torch import Tensor

Trajectory = Callable[[Tensor], Tensor]


class TrajectoryBatch(NamedTuple):
    """One batch through the teacher: trajectory (B, L+1, T, D); valid bool (B,) (the
    rows to use); labels (B,) or None; all on the teacher's device."""

    trajectory: Tensor
    valid: Tensor
    labels: Optional[Tensor]


class TrajectoryMLPBatch(NamedTuple):
    """A TrajectoryBatch with the blocks' MLP outputs mlp (B, L, T, D)."""

    trajectory: Tensor
    valid: Tensor
    labels: Optional[Tensor]
    mlp: Tensor


def rank_share(images: int, ranks: int) -> int:
    """The images one of `ranks` processes takes of a budget over all of them."""
    return math.ceil(images / max(int(ranks), 1))


def valid_rows(batch: Mapping[str, Tensor]) -> Tensor:
    """The batch's "valid" mask as bool (on the batch's device), every row when absent."""
    valid = batch.get("valid")
    if valid is None:
        return torch.ones(len(batch["image"]), dtype=torch.bool)
    return valid.bool()


def through_teacher(
    batch: Mapping[str, Tensor],
    trajectory: Trajectory,
    device: torch.device | str,
    valid: Optional[Tensor] = None,
    only_valid: bool = False,
    mlp_out: bool = False,
) -> TrajectoryBatch | TrajectoryMLPBatch:
    """One batch through the teacher. `valid` (default: the batch's own mask) marks the
    rows to use; with `only_valid` only those images are run (and returned); with
    `mlp_out` the blocks' MLP outputs come too (module docstring)."""
    valid = valid_rows(batch) if valid is None else valid
    images, labels = batch["image"], batch.get("label")
    if only_valid:
        images, labels = images[valid], None if labels is None else labels[valid]
        valid = valid[valid]
    with torch.no_grad():
        out = (
            trajectory(images.to(device), mlp_out=True)
            if mlp_out
            else trajectory(images.to(device))
        )
    labels = None if labels is None else labels.to(device)
    if mlp_out:
        return TrajectoryMLPBatch(out[0], valid.to(device), labels, out[1])
    return TrajectoryBatch(out, valid.to(device), labels)


def stream_trajectories(
    batches: Iterable[Mapping[str, Tensor]],
    trajectory: Trajectory,
    device: torch.device | str,
    images: Optional[int] = None,
    ranks: int = 1,
    only_valid: bool = False,
    progress: Optional[str] = None,
    mlp_out: bool = False,
) -> Iterator[TrajectoryBatch | TrajectoryMLPBatch]:
    """The loader's batches through the teacher, in order, until this process has used
    `rank_share(images, ranks)` valid images (all batches when `images` is None): the
    batch that reaches the budget has its later rows marked invalid (or, with
    `only_valid`, left out). Batches without a valid row are skipped. `progress`: the
    label of a progress bar in images (none when None). `mlp_out`: see `through_teacher`."""
    from tqdm.auto import tqdm

    limit = None if images is None else rank_share(images, ranks)
    seen = 0
    with tqdm(total=limit, desc=progress, unit="img", disable=progress is None) as bar:
        for batch in batches:
            valid = valid_rows(batch)
            if limit is not None:
                valid = valid & (torch.cumsum(valid, 0) <= limit - seen)
            n = int(valid.sum())
            if n:
                yield through_teacher(batch, trajectory, device, valid, only_valid, mlp_out)
                seen += n
                bar.update(n)
            if limit is not None and seen >= limit:
                break
