"""The models `raptor analyze` compares, each as a trajectory and the step that continues it:
the teacher (Teacher.trajectory, Teacher.step), a Raptor from a `raptor fit` run folder or
checkpoint (its rollout from the teacher's a_0, Raptor.step: a perturbation goes into its
recurrent rollout), or an exported backbone folder (its own stem and Raptor); the Raptors
are loaded and named by `raptor.eval.sources`, as `raptor probe` loads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

from torch import Tensor

from raptor.eval.sources import load_source, raptor_trajectory


@dataclass
class Model:
    """name; source (what was named); trajectory images -> (B, L+1, T, D); step (a, l) -> a_l;
    groups (token slices); boundaries: the Raptor's phase boundaries (none for the teacher)."""

    name: str
    source: str
    trajectory: Callable[[Tensor], Tensor]
    step: Callable[[Tensor, int], Tensor]
    groups: Dict[str, slice]
    num_layers: int
    dim: int
    boundaries: List[int] = field(default_factory=list)


def teacher_model(teacher) -> Model:
    return Model(
        "teacher",
        "teacher",
        teacher.trajectory,
        teacher.step,
        teacher.groups,
        teacher.num_layers,
        teacher.embed_dim,
    )


def raptor_model(source: str, teacher) -> Model:
    """A Raptor from a run folder, checkpoint or export folder (`raptor.eval.sources`)."""
    src = load_source(source, teacher, f"model={source}")
    return Model(
        src.name,
        src.source,
        lambda images: raptor_trajectory(src, teacher, images),
        src.raptor.step,
        teacher.groups if src.backbone is None else src.backbone.groups,
        src.raptor.num_layers,
        src.raptor.dim,
        list(src.raptor.boundaries),
    )
