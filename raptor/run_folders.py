"""Where each step of a run lives: the one layout `raptor pipeline` writes and every command
reads and writes by default, so that commands run one by one compose as the pipeline does.

    runs/NAME/                   the pipeline's root (its run_dir when given)
      shards/                    data.source digits | imagefolder:PATH (data.shards_dir when set)
      teacher/                   `raptor teacher`: teacher.safetensors
      phases/                    `raptor phases`: phases.json
      k{K}/stage1, k{K}/stage2   `raptor fit` (by model.k and train.stage)
      k{K}/eval                  `raptor eval`
      k{K}/export/backbone       `raptor export`
      dmd/                       `raptor dmd`
      probe/TASK                 `raptor probe` (probe/TASK-layerN for probe.layer=N), and
      probe/cache                its feature cache
      analysis/                  `raptor analyze` (teacher and Raptors side by side)

A command writes into run_dir when given, else into its folder above. The shards' folder
depends on the name alone (or data.shards_dir), never on run_dir. `command_config` also
takes each command's inputs from this layout unless the config gives them (shards, teacher
weights, phases file, stage-1 run) and makes every path a run stores absolute, so a run
folder reads the same from any working directory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from raptor.data.shards import MANIFEST
from raptor.errors import UserError
from raptor.eval.phases import PHASES_FILE
from raptor.train.runs import CKPT_DIR, LAST_CKPT

RUNS = Path("runs")
TEACHER_FILE = "teacher.safetensors"  # what `raptor teacher` writes into its folder
PATH_KEYS = ("data.shards_dir", "teacher.weights", "teacher.head", "phases.file")


@dataclass(frozen=True)
class RunFolders:
    """The folders of one run (absolute paths)."""

    root: Path
    shards: Path

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher_weights(self) -> Path:
        return self.teacher / TEACHER_FILE

    @property
    def phases(self) -> Path:
        return self.root / "phases"

    @property
    def phases_file(self) -> Path:
        return self.phases / PHASES_FILE

    @property
    def dmd(self) -> Path:
        return self.root / "dmd"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    def stage(self, k: int, stage: int) -> Path:
        return self.root / f"k{k}" / f"stage{stage}"

    def eval(self, k: int) -> Path:
        return self.root / f"k{k}" / "eval"

    def export(self, k: int) -> Path:
        return self.root / f"k{k}" / "export"

    def probe(self, task: str, layer: Optional[int] = None) -> Path:
        return self.root / "probe" / (task if layer is None else f"{task}-layer{layer}")


def run_folders(cfg: DictConfig, root: Optional[str | Path] = None) -> RunFolders:
    """The layout of cfg's run under `root` (default runs/NAME, relative to the working
    directory); the shards under runs/NAME unless data.shards_dir names them."""
    default = (RUNS / str(cfg.name)).absolute()
    shards = Path(cfg.data.shards_dir).absolute() if cfg.data.shards_dir else default / "shards"
    return RunFolders(Path(root).absolute() if root else default, shards)


def command_folder(cfg: DictConfig, command: str) -> Path:
    """The folder `raptor COMMAND` writes into: run_dir when given, else its layout folder."""
    if cfg.run_dir:
        return Path(cfg.run_dir).absolute()
    f, k = run_folders(cfg), int(cfg.model.k)
    if command == "fit":
        return f.stage(k, int(cfg.train.stage))
    if command == "probe":
        return f.probe(str(cfg.probe.task), cfg.probe.layer)
    folders = {"teacher": f.teacher, "phases": f.phases, "eval": f.eval(k), "dmd": f.dmd}
    return {**folders, "analyze": f.analysis}[command]


def final_runs(cfg: DictConfig) -> dict:
    """k -> the run folder the pipeline evaluates for each k of pipeline.ks (stage 2, or
    stage 1 when train.stages has no 2)."""
    f, stage = run_folders(cfg), 2 if 2 in cfg.train.stages else 1
    return {int(k): f.stage(int(k), stage) for k in cfg.pipeline.ks}


def beside_stage2(run: str | Path, name: str) -> Path:
    """The pipeline's `name` folder (eval, export) of the Raptor whose stage-2 run folder is
    `run` (or a checkpoint in it, RUN/checkpoints/*.ckpt): `k{K}/NAME` beside `k{K}/stage2`,
    or `RUN/NAME` for a folder named otherwise."""
    run = Path(run).absolute()
    if run.is_file():
        run = run.parent.parent
    return run.parent / name if run.name == "stage2" else run / name


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """A copy of cfg whose file and folder keys (PATH_KEYS, train.init_from) are absolute."""
    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        if cfg[section][leaf]:
            cfg[section][leaf] = str(Path(cfg[section][leaf]).expanduser().absolute())
    if cfg.train.init_from:
        parts = [s.strip() for s in str(cfg.train.init_from).split(",") if s.strip()]
        cfg.train.init_from = ",".join(str(Path(s).expanduser().absolute()) for s in parts)
    return cfg


def command_config(cfg: DictConfig, command: str, config: str = "CONFIG") -> DictConfig:
    """cfg for `raptor COMMAND` (teacher | phases | fit | dmd | eval | probe) with `config` the file
    named on the command line: its run folder, and each input it reads that the config does
    not give, from the layout, with a UserError naming the command that makes a missing one;
    every stored path absolute."""
    cfg = absolute_paths(cfg)
    f = run_folders(cfg)
    cfg.run_dir = str(command_folder(cfg, command))
    t = cfg.teacher
    if command != "teacher" and t.init == "weights" and not (t.weights or t.pretrained):
        if not f.teacher_weights.is_file():
            raise UserError(
                f"no teacher weights: {f.teacher_weights} does not exist; train the teacher "
                f"with `raptor teacher {config}` first, or set teacher.weights=PATH, "
                "teacher.pretrained=true, or teacher.init=random"
            )
        t.weights = str(f.teacher_weights)
    if cfg.data.source != "shards":
        cfg.data.shards_dir = str(f.shards)
        if command != "teacher" and not (f.shards / MANIFEST).is_file():  # teacher writes them
            raise UserError(
                f"no shards of data.source={cfg.data.source} in {f.shards}: write them with "
                f"`raptor shards write {config}` first, or set data.shards_dir=PATH"
            )
    if command in ("fit", "dmd") and cfg.phases.boundaries is None and not cfg.phases.file:
        if f.phases_file.is_file():
            cfg.phases.file = str(f.phases_file)
        elif command == "fit":  # `raptor dmd` falls back to dmd.spans or the whole depth
            raise UserError(
                f"no phases: {f.phases_file} does not exist; find them with "
                f"`raptor phases {config}` first, or set phases.boundaries=[...] or "
                "phases.file=PATH"
            )
    fresh = 1 not in cfg.train.stages  # stage 2 without stage 1: fresh blocks on purpose
    if command == "fit" and int(cfg.train.stage) == 2 and not cfg.train.init_from and not fresh:
        stage1 = f.stage(int(cfg.model.k), 1)
        if not (stage1 / CKPT_DIR / LAST_CKPT).is_file():
            raise UserError(
                f"stage 2 starts from stage 1, and {stage1} holds no {CKPT_DIR}/{LAST_CKPT}: "
                f"train it with `raptor fit {config} model.k={cfg.model.k} stage=1` first, or set "
                "train.init_from=PATH"
            )
        cfg.train.init_from = str(stage1)
    return cfg
