"""The models `raptor analyze` compares, each as a trajectory and the step that continues it:
the teacher (Teacher.trajectory, Teacher.step), a Raptor from a `raptor fit` run folder or
checkpoint (its rollout from the teacher's a_0, Raptor.step: a perturbation goes into its
recurrent rollout), or an exported backbone folder (its own stem and Raptor)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import Tensor

from raptor.errors import UserError


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


def label(source: str) -> str:
    """A short name for a Raptor: its k{K} folder in the pipeline's layout, else its folder's
    name; " export" for an exported backbone."""
    parts = Path(source.split(",")[0]).absolute().parts
    ks = [p for p in parts if re.fullmatch(r"k\d+", p)]
    name = ks[-1] if ks else Path(source.split(",")[0]).absolute().name
    return f"{name} export" if "export" in parts else name


def raptor_model(source: str, teacher, device: torch.device | str) -> Model:
    """A Raptor: an export folder (config.json inside) or what `load_raptor` reads; it must
    have the teacher's depth and width."""
    from raptor.model.backbone import CONFIG_NAME, RaptorBackbone

    path = Path(source.split(",")[0]).expanduser()
    if not path.exists():
        raise UserError(
            f"model={source}: no such run folder, checkpoint or export folder (or say model=teacher)"
        )
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        net = RaptorBackbone.from_pretrained(path).to(device).eval()
        raptor, trajectory, groups = net.raptor, net.trajectory, net.groups
    else:
        from raptor.train.checkpoints import load_raptor

        raptor = load_raptor(source, error=UserError)[0].to(device).eval()
        groups = teacher.groups

        @torch.no_grad()
        def trajectory(images: Tensor) -> Tensor:
            a0 = teacher.embed(images)
            return torch.cat([a0[:, None], raptor(a0)], dim=1)

    if (raptor.num_layers, raptor.dim) != (teacher.num_layers, teacher.embed_dim):
        raise UserError(
            f"model={source}: a Raptor of {raptor.num_layers} layers of width {raptor.dim}, but "
            f"the teacher has {teacher.num_layers} of width {teacher.embed_dim}"
        )
    return Model(
        label(source),
        str(source),
        trajectory,
        raptor.step,
        groups,
        raptor.num_layers,
        raptor.dim,
        list(raptor.boundaries),
    )


def unique_names(models: List[Model]) -> List[Model]:
    """Numbers repeated names (k2, k2 #2, ...) so every model has its own."""
    seen: Dict[str, int] = {}
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:
            m.name = f"{m.name} #{seen[m.name]}"
    return models
