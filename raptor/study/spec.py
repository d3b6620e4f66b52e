"""The study file: a base pipeline config plus axes of overrides, expanded into cells.

A study YAML (configs/studies/) has these keys:

    name: digits_sd              # the study's folder: runs/studies/NAME (`--out` to change)
    config: ../demo.yaml         # the base pipeline config, relative to this file
    set: {key: value, ...}       # overrides for every cell: a mapping, a YAML file of one
                                 # (relative to the study file), or a list of these
    grid: {key: [v1, v2], ...}   # one cell per combination (cartesian product, in order)
    cells:                       # entries crossed with the grid (default: one plain entry)
      - name: maxcut             # the entry's name (part of the cell's name)
        config: FILE             # optional: another base config for this entry
        set: {key: value}        # overrides of this entry
      - name: random
        each: {phases.boundaries: random_k3}   # one cell per item of the derived list
                                               # (named random-0, random-1, ...)
    derived:                     # named values computed from the study, used by `each`
      random_k3: {random_partitions: {k: 3, count: 10, seed: 0}}
    seeds: [0, 1]                # every cell once per seed (default: the config's own)
    seed_keys: [train.seed]      # the keys a seed sets (train.seed: teacher and Raptor)
    shared: PATH                 # folder of the steps cells share (default: the study
                                 # folder's parent / shared, so studies share them too)
    report: {x: KEY, compare: {best: ENTRY, against: ENTRY}}   # how `raptor.study.aggregate`
                                 # plots: metrics against a grid key; an entry against the
                                 # distribution over another's cells (gap in std)

Derived values:
- `random_partitions: {k, count, seed, num_layers, min_length}`: `count` distinct contiguous
  partitions of 1..num_layers (default: the base config's teacher.depth) into k phases of at
  least min_length (1) layers, drawn uniformly without replacement with numpy's generator
  seeded by `seed`; each is a boundaries list (`phases.boundaries`).
- `maxcut: {k}`: the max-cut partition into k phases, found by the cells' shared phases step:
  the value null for phases.boundaries (with `phases.ks` holding k: the shared phases step
  partitions for every k in phases.ks).

Overrides are applied in this order: the base config, `set`, the command line's key=value,
the grid's values, the entry's `set` and `each` value, the seed. A cell's name joins the
entry's name (with the item's index for `each`), `key=value` for each grid key (its last
component) and `seed=S`; its folder is `cells/NAME`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from raptor.config import ConfigError, load_config

STUDY_KEYS = ("name", "config", "set", "grid", "cells", "derived", "seeds", "seed_keys")
STUDY_KEYS += ("shared", "report")
ENTRY_KEYS = ("name", "config", "set", "each")
DERIVED_KINDS = ("random_partitions", "maxcut")


@dataclass
class Cell:
    """One pipeline of a study: its index, name, entry, grid values, seed, base config file
    and override list (`key=value`, in the order of the module docstring)."""

    index: int
    name: str
    entry: str
    values: Dict[str, Any]
    seed: Optional[int]
    config: Path
    overrides: List[str]
    _cfg: Optional[DictConfig] = field(default=None, repr=False, compare=False)

    def load(self) -> DictConfig:
        """The cell's validated pipeline config (a copy of the one loaded first)."""
        if self._cfg is None:
            self._cfg = load_config(self.config, self.overrides)
        return copy.deepcopy(self._cfg)

    @property
    def group(self) -> str:
        """The cell's name without its seed: what mean and std over seeds group by."""
        return self.name.rsplit("_seed=", 1)[0] if self.seed is not None else self.name


@dataclass
class Study:
    """A study file expanded: its name, file, folder, shared folder, cells and report."""

    name: str
    file: Path
    out: Path
    shared: Path
    cells: List[Cell]
    report: Dict[str, Any] = field(default_factory=dict)
    overrides: List[str] = field(default_factory=list)

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name


def _fail(file: Path, message: str) -> ConfigError:
    return ConfigError(f"study {file}: {message}")


def _dotlist(file: Path, where: str, spec: Any) -> List[str]:
    """`set` values -> ["key=value", ...]: a mapping (nested or dotted keys), the name of a
    YAML file holding one (relative to the study file), or a list of these, in order."""
    if spec is None:
        return []
    if isinstance(spec, list):
        return [item for part in spec for item in _dotlist(file, where, part)]
    if isinstance(spec, str):
        path = file.parent / spec
        if not path.is_file():
            raise _fail(file, f"{where}: file not found: {path}")
        return _dotlist(path, where, OmegaConf.to_container(OmegaConf.load(path)))
    if not isinstance(spec, dict):
        raise _fail(file, f"{where} must be a mapping of config keys to values, got {spec!r}")
    out = []
    for key, value in spec.items():
        if isinstance(value, dict) and value:
            out += [f"{key}.{item}" for item in _dotlist(file, where, value)]
        else:
            out.append(f"{key}={_text(value)}")
    return out


def _text(value: Any) -> str:
    """A value as override text that OmegaConf reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return str(value).lower() if isinstance(value, bool) else str(value)


def random_partitions(
    num_layers: int, k: int, count: int, seed: int, min_length: int = 1
) -> List[List[int]]:
    """`count` distinct contiguous k-partitions of 1..num_layers (boundaries lists), phases of
    at least `min_length` layers, uniformly without replacement (numpy generator `seed`)."""
    every = [
        list(b)
        for b in itertools.combinations(range(1, num_layers), k - 1)
        if all(hi - lo >= min_length for lo, hi in zip((0,) + b, b + (num_layers,), strict=True))
    ]
    if count > len(every):
        raise ConfigError(
            f"random_partitions: {count} distinct partitions of {num_layers} layers into {k} "
            f"phases of >= {min_length} layer(s) asked, only {len(every)} exist"
        )
    picks = np.random.default_rng(seed).choice(len(every), size=count, replace=False)
    return [every[int(i)] for i in picks]


def _derived(file: Path, spec: Any, base: DictConfig) -> Dict[str, List[Any]]:
    """Name -> list of values of the study's `derived` section."""
    out: Dict[str, List[Any]] = {}
    for name, item in (spec or {}).items():
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in DERIVED_KINDS:
            raise _fail(
                file, f"derived.{name} must be one of {{{', '.join(DERIVED_KINDS)}: {{...}}}}"
            )
        kind, args = next(iter(item.items()))
        args = dict(args or {})
        try:
            if kind == "random_partitions":
                out[name] = random_partitions(
                    int(args.pop("num_layers", base.teacher.depth)),
                    int(args.pop("k")),
                    int(args.pop("count")),
                    int(args.pop("seed", 0)),
                    int(args.pop("min_length", 1)),
                )
            else:
                args.pop("k")
                out[name] = [None]
        except KeyError as exc:
            raise _fail(file, f"derived.{name}.{kind} needs {exc.args[0]}") from None
        if args:
            raise _fail(file, f"derived.{name}.{kind}: unknown keys {sorted(args)}")
    return out


def load_study(
    file: str | Path,
    overrides: Optional[List[str]] = None,
    out: Optional[str | Path] = None,
    validate: bool = True,
) -> Study:
    """Read and expand a study file (module docstring); `overrides` (key=value) apply to
    every cell; `out` replaces runs/studies/NAME. With `validate`, every cell's config is
    loaded here, so a bad value fails before anything runs (a cell's own task skips it)."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"study file not found: {file}")
    raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    if not isinstance(raw, dict):
        raise _fail(file, "expected a mapping at the top level")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise _fail(file, f"unknown keys {unknown}; a study has {', '.join(STUDY_KEYS)}")
    for key in ("name", "config"):
        if not raw.get(key):
            raise _fail(file, f"`{key}` is required")
    name = str(raw["name"])
    base_file = file.parent / str(raw["config"])
    common = _dotlist(file, "set", raw.get("set")) + list(overrides or [])
    base = load_config(base_file, common)
    derived = _derived(file, raw.get("derived"), base)

    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise _fail(file, "grid must map config keys to non-empty lists of values")
    seeds = raw.get("seeds") or [None]
    seed_keys = raw.get("seed_keys") or ["train.seed"]
    entries = raw.get("cells") or [{}]
    expanded = []  # (entry, its cell name part, config file, overrides)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - set(ENTRY_KEYS):
            raise _fail(file, f"cells[{i}] must be a mapping with keys from {ENTRY_KEYS}")
        entry_name = str(entry.get("name", ""))
        config = file.parent / str(entry["config"]) if entry.get("config") else base_file
        sets = _dotlist(file, f"cells[{i}].set", entry.get("set"))
        each = entry.get("each")
        if each is None:
            expanded.append((entry_name, entry_name, config, sets))
            continue
        if (
            not isinstance(each, dict)
            or len(each) != 1
            or str(next(iter(each.values()))) not in derived
        ):
            raise _fail(file, f"cells[{i}].each must be {{KEY: NAME}} with NAME in derived")
        key, ref = next(iter(each.items()))
        values = derived[str(ref)]
        for j, value in enumerate(values):
            part = f"{entry_name}-{j}" if len(values) > 1 else entry_name
            expanded.append((entry_name, part, config, sets + [f"{key}={_text(value)}"]))

    cells: List[Cell] = []
    for (entry_name, part, config, sets), combo, seed in itertools.product(
        expanded, itertools.product(*grid.values()), seeds
    ):
        values = dict(zip(grid, combo, strict=True))
        parts = [part] if part else []
        parts += [f"{k.rsplit('.', 1)[-1]}={_text(v)}" for k, v in values.items()]
        parts += [] if seed is None else [f"seed={seed}"]
        cell_overrides = common + [f"{k}={_text(v)}" for k, v in values.items()] + sets
        cell_overrides += [] if seed is None else [f"{k}={seed}" for k in seed_keys]
        name_ = "_".join(parts) or "cell"
        cell = Cell(len(cells), name_, entry_name, values, seed, config, cell_overrides)
        if validate:
            cell.load()
        cells.append(cell)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise _fail(file, "two cells have the same name; give the cells entries distinct names")
    out = Path(out) if out else Path("runs") / "studies" / name
    shared = Path(raw["shared"]) if raw.get("shared") else out.parent / "shared"
    report = raw.get("report") or {}
    return Study(
        name, file, out.absolute(), shared.absolute(), cells, report, list(overrides or [])
    )
