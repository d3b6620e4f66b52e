"""`Partition`: k contiguous phases covering a teacher's layers 1..L.

Written as boundaries, the last layer of every phase but the last: [7, 10] with
L = 12 is the phases 1-7, 8-10 and 11-12. Block j (0-based) of a Raptor
produces the layers of phase j from the state after the layer before it; a DMD
span (i, p) covers the same phase as the input state a_i, i = first - 1, and
p = last - first + 1 steps. JSON form: {"num_layers": L, "boundaries": [...]};
a `phases.json` of `raptor phases` holds one partition per k under "partitions".
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raptor.errors import UserError


class ArchitectureError(UserError):
    """A Raptor's architecture or phase partition does not fit (config, checkpoint, export)."""


_FIX_BOUNDARIES = "; fix phases.boundaries or phases.file, or rerun `raptor phases`"


def check_boundaries(boundaries: Sequence[int], num_layers: int, k: int | None = None) -> list[int]:
    """Validate a phase partition; returns it as a list of ints.

    boundaries: the last layer of every phase but the last, strictly increasing,
    each in 1..L-1; k phases need k-1 of them.
    """
    b = [int(x) for x in boundaries]
    what = f"phase boundaries {b} for {num_layers} layers"
    if k is not None and len(b) != k - 1:
        raise ArchitectureError(
            f"{what}: k={k} phases need {k - 1} boundaries, got {len(b)}{_FIX_BOUNDARIES}"
        )
    if any(x < 1 or x > num_layers - 1 for x in b):
        raise ArchitectureError(
            f"{what}: every boundary must lie in 1..{num_layers - 1} (last layer of a phase but "
            f"the last){_FIX_BOUNDARIES}"
        )
    if any(b2 <= b1 for b1, b2 in zip(b, b[1:])):
        raise ArchitectureError(f"{what}: boundaries must be strictly increasing{_FIX_BOUNDARIES}")
    return b


@dataclass(frozen=True)
class Partition:
    """A validated phase partition of layers 1..num_layers (see the module docstring)."""

    num_layers: int
    boundaries: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if int(self.num_layers) < 1:
            raise ArchitectureError(f"a partition needs num_layers >= 1, got {self.num_layers}")
        object.__setattr__(self, "num_layers", int(self.num_layers))
        boundaries = check_boundaries(self.boundaries, self.num_layers)
        object.__setattr__(self, "boundaries", tuple(boundaries))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def even(cls, num_layers: int, k: int) -> Partition:
        """k phases of (nearly) equal length: boundary j is round(L * j / k), j = 1..k-1."""
        return cls(num_layers, [round(num_layers * (j + 1) / k) for j in range(k - 1)])

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Partition:
        """Inverse of `to_json`."""
        return cls(int(data["num_layers"]), data["boundaries"])

    @classmethod
    def from_file(cls, path: str | Path, k: int) -> Partition:
        """The k-phase partition in a phases file: one partition
        {"num_layers": L, "boundaries": [...]} or the `phases.json` written by
        `raptor phases` ({"num_layers": L, "partitions": {"2": [...], ...}, ...})."""
        from raptor.config import ConfigError  # omegaconf: not needed to load a backbone

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"phases file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"phases file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "num_layers" not in data:
            raise ConfigError(f"phases file {path}: expected a JSON object with 'num_layers'")
        if "partitions" in data:
            parts = data["partitions"]
            if str(k) not in parts:
                raise ConfigError(
                    f"phases file {path} has partitions for k in {sorted(parts, key=int)}, not k={k}"
                )
            boundaries = parts[str(k)]
        elif "boundaries" in data:
            boundaries = data["boundaries"]
        else:
            raise ConfigError(
                f"phases file {path}: expected a 'boundaries' list or a 'partitions' mapping"
            )
        try:
            num_layers = int(data["num_layers"])
            return cls(num_layers, check_boundaries(boundaries, num_layers, k))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"phases file {path}: {exc}") from None

    @classmethod
    def from_config(cls, cfg: Any, num_layers: int) -> Partition:
        """`phases.boundaries`, else the model.k partition in `phases.file`, for a teacher
        of `num_layers` layers."""
        from raptor.config import ConfigError  # omegaconf: not needed to load a backbone

        if cfg.phases.boundaries is not None:
            return cls(num_layers, cfg.phases.boundaries)
        if cfg.phases.file:
            found = cls.from_file(cfg.phases.file, int(cfg.model.k))
            if found.num_layers != num_layers:
                raise ConfigError(
                    f"phases file {cfg.phases.file} splits {found.num_layers} layers but the "
                    f"teacher has {num_layers}; rerun `raptor phases` for this teacher"
                )
            return found
        raise ConfigError(
            f"no phase partition for model.k={cfg.model.k} ({num_layers} teacher layers): set "
            "phases.boundaries=[...] or phases.file=PATH (a phases.json written by `raptor phases`)"
        )

    # ------------------------------------------------------------------ views

    @property
    def k(self) -> int:
        return len(self.boundaries) + 1

    @property
    def edges(self) -> list[int]:
        """[0, *boundaries, L]: phase j covers layers edges[j] + 1 .. edges[j + 1]."""
        return [0, *self.boundaries, self.num_layers]

    @property
    def phases(self) -> list[tuple[int, int]]:
        """(first, last) layer of every phase, 1-based inclusive."""
        e = self.edges
        return [(a + 1, b) for a, b in zip(e, e[1:])]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """DMD spans (i, p) of the phases: input state a_i, p layers."""
        e = self.edges
        return [(a, b - a) for a, b in zip(e, e[1:])]

    def block_of(self, layer: int) -> int:
        """0-based index of the phase (block) that produces `layer` (1..L)."""
        if not 1 <= int(layer) <= self.num_layers:
            raise ValueError(f"layer {layer} is outside 1..{self.num_layers}")
        return bisect.bisect_left(self.boundaries, int(layer))

    def with_k(self, k: int) -> Partition:
        """This partition, once checked to have k phases (model.k)."""
        check_boundaries(self.boundaries, self.num_layers, k)
        return self

    def to_json(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "boundaries": list(self.boundaries)}
