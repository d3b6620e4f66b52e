"""The Raptors an evaluation command reads, from what a user names: a run folder or .ckpt
(`load_raptor`: a stage-2 run, a stage-1 run of all blocks, or stage-1 runs joined by
commas) or an exported backbone folder. `raptor probe` and `raptor analyze` both load
models here, so they take the same sources, check them the same way and name them alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch

from raptor.errors import UserError


@dataclass
class RaptorSource:
    """A loaded Raptor, in eval mode on the teacher's device.

    name: a short label (`label`); source: what was named; raptor: the recurrent blocks;
    backbone: the exported backbone (its own stem and final norm) or None for a training
    run, which starts from the teacher's a_0; paths: the checkpoint files read (an
    export: its folder)."""

    name: str
    source: str
    raptor: Any
    backbone: Optional[Any]
    paths: List[Path]

    @property
    def kind(self) -> str:
        return "raptor" if self.backbone is None else "export"


def label(source: str | Path) -> str:
    """A short name: the source's k{K} folder in the pipeline's layout, else its folder's
    name; " export" appended for an export. Joined sources are named by the first."""
    path = Path(str(source).split(",")[0]).expanduser().absolute()
    ks = [p for p in path.parts if re.fullmatch(r"k\d+", p)]
    name = ks[-1] if ks else path.name
    return f"{name} export" if "export" in path.parts else name


def load_source(source: str | Path, teacher: Any, what: str, hint: str = "") -> RaptorSource:
    """The Raptor of `source`, on the teacher's device, with the teacher's depth and width.
    `what` starts every error message (the option that named it, e.g. "model=PATH");
    `hint` ends the one for a source that does not exist (e.g. the names allowed instead)."""
    from raptor.model.backbone import CONFIG_NAME, RaptorBackbone
    from raptor.train.checkpoints import load_raptor
    from raptor.train.runs import CKPT_DIR, LAST_CKPT

    device = next(teacher.parameters()).device
    first = Path(str(source).split(",")[0]).expanduser()
    if not first.exists():
        raise UserError(
            f"{what}: no such run folder, checkpoint or export folder (with {CONFIG_NAME})" + hint
        )
    if first.is_dir() and (first / CONFIG_NAME).is_file():
        backbone = RaptorBackbone.from_pretrained(first).to(device).eval()
        raptor, paths = backbone.raptor, [first.absolute()]
    elif (first / CKPT_DIR / LAST_CKPT).is_file() or first.is_file():
        backbone = None
        raptor, _, paths = load_raptor(str(source), error=UserError)
        raptor = raptor.to(device).eval()
    else:
        raise UserError(
            f"{what} is not a Raptor run folder (with {CKPT_DIR}/{LAST_CKPT}), a .ckpt file or "
            f"an exported backbone folder (with {CONFIG_NAME})"
        )
    if (raptor.num_layers, raptor.dim) != (teacher.num_layers, teacher.embed_dim):
        raise UserError(
            f"{what}: a Raptor of {raptor.num_layers} layers of width {raptor.dim}, but the "
            f"teacher has {teacher.num_layers} of width {teacher.embed_dim}"
        )
    return RaptorSource(label(source), str(source), raptor, backbone, list(paths))


def unique_names(names: List[str]) -> List[str]:
    """The names with repeats numbered ("k2", "k2 #2", ...), so each model has its own."""
    seen: dict = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


@torch.no_grad()
def raptor_trajectory(src: RaptorSource, teacher: Any, images: torch.Tensor) -> torch.Tensor:
    """(B, L+1, T, D): a_0 (the export's own stem, else the teacher's) and the rollout."""
    if src.backbone is not None:
        return src.backbone.trajectory(images)
    a0 = teacher.embed(images)
    return torch.cat([a0[:, None], src.raptor(a0)], dim=1)
