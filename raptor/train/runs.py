"""Run folders, loggers and the Lightning Trainer every training command shares.

A run folder holds the resolved `config.yaml`, `metrics.csv` (always), the W&B
files when W&B is on (with the run id kept in `wandb_id.txt`, so a resumed or
requeued job continues the same W&B run), TensorBoard event files when
`logging.tensorboard` is on (read by `raptor dashboard`), `checkpoints/` (with
`last.ckpt`, the checkpoint a rerun resumes from) and PNG plots.

W&B runs are organised per pipeline: the group is the config's name, the job type the
step (`JOBS`), the run name `NAME/k3/stage2` (`step_name`), tags the teacher, k and the
partition; validation metrics plot against the global step and keep their best (R^2:
max, losses: min) or final (top-1) value in the summary (`METRIC_SUMMARIES`).
`log_fidelity` adds the per-layer table and line plot of a validation and its headline
numbers to the summary; `log_lineage` logs a step's output as an artifact and declares
the artifacts it consumed (offline: staged in the run's files, uploaded by `wandb sync`).
"""

from __future__ import annotations

import csv
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf

from raptor import distributed
from raptor.config import save_config
from raptor.errors import UserError

WANDB_ID_FILE = "wandb_id.txt"
CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
METRICS_FILE = "metrics.csv"
# W&B job types; those of one Raptor (model.k) are named NAME/k{K}/JOB
JOBS = ("teacher", "phases", "stage1", "stage2", "dmd", "eval", "export", "probe", "analyze")
PER_K_JOBS = ("stage1", "stage2", "eval", "export")
# W&B summary reduction of the validation metrics (globs), the rest keep their last value
METRIC_SUMMARIES = {"val/r2*": "max", "val/loss*": "min", "val/top1*": "last"}


def prepare_run_dir(cfg: DictConfig, run_dir: Optional[str | Path] = None) -> Path:
    """Create the run folder (default `cfg.run_dir`) and write the resolved config."""
    path = Path(run_dir or cfg.run_dir)
    path.mkdir(parents=True, exist_ok=True)
    if distributed.is_rank_zero():
        save_config(cfg, path)
    return path


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id: read from the run folder, or made once and stored there."""
    path = Path(run_dir) / WANDB_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            with open(path, "x") as fh:  # first writer wins; others read it back
                fh.write(uuid.uuid4().hex[:12])
        except FileExistsError:
            pass
    return path.read_text().strip()


def _read_metrics(path: Path) -> tuple[list[str], list[dict], int]:
    """The header and rows of a metrics.csv, without the rows a kill cut short (fewer or
    more fields than the header: a row being appended when the process died), and how
    many those were (each dropped with a message on stderr)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        keys, rows = reader.fieldnames or [], list(reader)
    whole = [r for r in rows if None not in r and None not in r.values()]
    if len(whole) < len(rows):
        print(
            f"raptor: {path}: dropped {len(rows) - len(whole)} row(s) cut short by an "
            "interrupted write (the resumed run logs its steps again)",
            file=sys.stderr,
        )
    return keys, whole, len(rows) - len(whole)


def _write_metrics(path: Path, keys: list[str], rows: list[dict]) -> None:
    """Replace `path` by these rows at once (a temporary file renamed over it): a process
    killed meanwhile leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class _AppendingCSVWriter:
    """Mixin for Lightning's CSV writer: keep the interrupted run's `metrics.csv` and
    append to it (Lightning deletes it when the folder is reused, losing a resumed
    run's history), and rewrite it for new columns atomically (Lightning truncates it
    first: a run killed then, e.g. right after a validation logs its first val/ keys,
    lost its rows or left a header cut in two)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = next(csv.reader(fh), [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        _write_metrics(path, fieldnames, _read_metrics(path)[1])


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows of `run_dir/metrics.csv` logged at `step` or later (rank 0): a run
    resumed from a checkpoint at `step` (0: a fresh start) logs them again; rows cut
    short by the interruption go too (`_read_metrics`)."""
    path = Path(run_dir) / METRICS_FILE
    if not distributed.is_rank_zero() or not path.is_file():
        return
    keys, rows, cut = _read_metrics(path)
    keep = [r for r in rows if int(r["step"]) < step]
    if cut or len(keep) < len(rows):
        _write_metrics(path, keys, keep)


def _csv_logger(run_dir: Path):
    """CSVLogger writing `run_dir/metrics.csv`, appending across resumes."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class Writer(_AppendingCSVWriter, ExperimentWriter):
        pass

    class Logger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                Path(self.log_dir).mkdir(parents=True, exist_ok=True)
                self._experiment = Writer(log_dir=self.log_dir)
            return self._experiment

    return Logger(save_dir=str(run_dir), name="", version="")


def step_name(cfg: DictConfig, job: str) -> str:
    """The W&B run name of a pipeline step: NAME/JOB, NAME/k{K}/JOB for one Raptor's,
    NAME/probe/TASK for a probe."""
    if job == "probe":
        return f"{cfg.name}/probe/{cfg.probe.task}"
    return f"{cfg.name}/k{cfg.model.k}/{job}" if job in PER_K_JOBS else f"{cfg.name}/{job}"


def wandb_tags(cfg: DictConfig, job: str) -> List[str]:
    """teacher:NAME, and for one Raptor's steps k=K and phases=B1,B2 (its boundaries)."""
    tags = [f"teacher:{cfg.teacher.name}"]
    if job in PER_K_JOBS:
        from raptor.model.partition import Partition

        tags.append(f"k={cfg.model.k}")
        bounds = cfg.phases.boundaries
        if bounds is None and cfg.phases.file and Path(cfg.phases.file).is_file():
            bounds = Partition.from_file(cfg.phases.file, int(cfg.model.k)).boundaries
        if bounds is not None:
            tags.append("phases=" + ",".join(str(int(b)) for b in bounds))
    return tags


def wandb_settings(cfg: DictConfig, run_dir: Path, job: str) -> dict:
    """`wandb.init` arguments of the step `job` run in `run_dir` (its id kept there)."""
    if job not in JOBS:
        raise ValueError(f"W&B job type must be one of {JOBS}, got {job!r}")
    return dict(
        project=cfg.logging.project,
        entity=cfg.logging.entity,
        name=cfg.logging.run_name or step_name(cfg, job),
        group=cfg.name,
        job_type=job,
        tags=wandb_tags(cfg, job),
        dir=str(run_dir),
        id=wandb_run_id(run_dir),
        resume="allow",
        mode=cfg.logging.wandb,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _define_metrics(run: Any) -> None:
    for glob, summary in METRIC_SUMMARIES.items():
        run.define_metric(glob, step_metric="trainer/global_step", summary=summary)


def _wandb_logger(cfg: DictConfig, run_dir: Path, job: str):
    """Lightning's WandbLogger opening the step's run (`wandb_settings`), with the
    summary reductions of `METRIC_SUMMARIES` defined when the run starts."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    class Logger(WandbLogger):
        @property
        def experiment(self):
            started = self._experiment is not None
            run = super().experiment
            if not started and isinstance(run, wandb.Run):
                _define_metrics(run)
            return run

    if wandb.run is not None:  # a previous step of this process: WandbLogger would reuse it
        wandb.finish()
    settings = wandb_settings(cfg, run_dir, job)
    mode, save_dir = settings.pop("mode"), settings.pop("dir")
    return Logger(save_dir=save_dir, offline=mode == "offline", **settings)


def require_tensorboard(what: str) -> None:
    """UserError naming `what` and the extra to install when tensorboard is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            f"{what} needs the tensorboard package, which is not installed: "
            "pip install 'raptor-vit[tensorboard]'"
        )


def markdown_table(columns: List[str], data: List[List[Any]]) -> str:
    """A markdown table (TensorBoard's text panel renders it); floats to 4 significant digits."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [columns, ["---"] * len(columns), *([cell(v) for v in row] for row in data)]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def _tensorboard_logger(run_dir: Path):
    """TensorBoardLogger writing event files into `run_dir`: the CSV's scalars, plus the figures
    and tables sent to loggers with `log_image` / `log_table` (as W&B takes them), as
    images and markdown text."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_only

    class Logger(TensorBoardLogger):
        @rank_zero_only
        def log_image(self, key: str, images: List[Any], step: Optional[int] = None) -> None:
            """`images`: PNG paths (as `dmd.plots.save_figure` sends them) or arrays (HWC)."""
            import numpy as np
            from PIL import Image

            for i, image in enumerate(images):
                if isinstance(image, (str, Path)):
                    with Image.open(image) as im:
                        image = np.asarray(im.convert("RGB"))
                tag = key if len(images) == 1 else f"{key}/{i}"
                self.experiment.add_image(tag, image, step, dataformats="HWC")
            self.experiment.flush()  # callers (phases) may never finalize this logger

        @rank_zero_only
        def log_table(
            self,
            key: str,
            columns: List[str],
            data: List[List[Any]],
            step: Optional[int] = None,
        ) -> None:
            self.experiment.add_text(key, markdown_table(columns, data), step)
            self.experiment.flush()

    return Logger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)


def make_loggers(cfg: DictConfig, run_dir: Path, job: str = "") -> List[Any]:
    """CSV always (`run_dir/metrics.csv`); TensorBoard events (in `run_dir`) when
    `logging.tensorboard` is on; W&B when `logging.wandb` is online/offline, as the step
    `job` (one of `JOBS`; default stage{train.stage})."""
    loggers: List[Any] = [_csv_logger(run_dir)]
    if cfg.logging.tensorboard:
        require_tensorboard("logging.tensorboard=true")
        loggers.append(_tensorboard_logger(run_dir))
    if cfg.logging.wandb != "disabled":  # online | offline (checked by the schema)
        loggers.append(_wandb_logger(cfg, run_dir, job or f"stage{cfg.train.stage}"))
    return loggers


def _wandb_run(loggers: Iterable[Any]):
    """The W&B run among Lightning `loggers` on this rank, or None."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and isinstance(logger.experiment, wandb.Run):
            return logger.experiment
    return None


def log_fidelity(loggers: Iterable[Any], table: Any, step: int, summary: dict) -> None:
    """A validation's per-layer fidelity (a `dmd.metrics.FidelityTable`) to the W&B run
    among `loggers` at `step`: the table val/fidelity (a row per layer and token group)
    and the line plot val/fidelity_r2 (R^2 per layer, a line per group); `summary`
    (headline numbers) goes to the run summary. TensorBoard loggers get the table as text."""
    from lightning.pytorch.loggers import TensorBoardLogger

    rows = table.rows()
    columns = list(rows[0]) if rows else ["layer", "group"]
    cells = [[r[c] for c in columns] for r in rows]
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_table("val/fidelity", columns, cells, step)
    run = _wandb_run(loggers)
    if run is None:
        return
    import wandb

    data = wandb.Table(columns=columns, data=cells)
    plot = wandb.plot.line_series(
        xs=table.layers,
        ys=[table.get("r2", g) for g in table.groups],
        keys=table.groups,
        title="R^2 per layer",
        xname="layer",
    )
    run.log({"val/fidelity": data, "val/fidelity_r2": plot, "trainer/global_step": step})
    run.summary.update(summary)


# the artifact each step logs: (type, path in its folder; a folder is logged whole)
ARTIFACTS = {
    "teacher": ("model", "teacher.safetensors"),
    "phases": ("phases", "phases.json"),
    "stage1": ("model", f"{CKPT_DIR}/{LAST_CKPT}"),
    "stage2": ("model", f"{CKPT_DIR}/{LAST_CKPT}"),
    "eval": ("evaluation", "eval.json"),
    "export": ("model", "backbone"),
    "probe": ("evaluation", "probe.json"),
    "analyze": ("analysis", "analysis.json"),
}


def step_artifact(cfg: DictConfig, job: str, folder: Path):
    """The W&B artifact of the step `job` run in `folder` (named like its run, '/' -> '-';
    files referenced in place, not copied: the same content gives the same digest, so a
    consumer building it again refers to the version its producer logged)."""
    import wandb

    kind, rel = ARTIFACTS[job]
    path = Path(folder) / rel
    if not path.exists():
        raise UserError(f"{path}: the {job} step's output is missing, cannot log its artifact")
    art = wandb.Artifact(step_name(cfg, job).replace("/", "-"), type=kind)
    if path.is_dir():
        art.add_dir(str(path), policy="immutable")
    else:
        art.add_file(str(path), policy="immutable")
    return art


def log_lineage(
    cfg: DictConfig, job: str, folder: Path, used: Iterable[tuple[DictConfig, str, Path]] = ()
) -> None:
    """W&B lineage of the step `job` run in `folder` (rank 0, W&B on): declares the
    artifacts of the upstream steps `used` ((their config, job, folder)) as its inputs,
    logs its own output artifact (`ARTIFACTS`), and finishes its run (the one its loggers
    opened, or a new segment of it, e.g. for export, which logs nothing else)."""
    if cfg.logging.wandb == "disabled" or not distributed.is_rank_zero():
        return
    import wandb

    settings = wandb_settings(cfg, folder, job)
    run = wandb.run
    if run is None or run.id != settings["id"]:
        if run is not None:
            wandb.finish()
        run = wandb.init(**settings)
    for up_cfg, up_job, up_folder in used:
        if up_job not in ARTIFACTS:
            continue
        art = step_artifact(up_cfg, up_job, up_folder)
        if run.settings._offline:  # run.use_artifact refuses offline runs: the record it
            # would write for a new artifact, kept for `wandb sync` to declare the use
            run._log_artifact(art, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(art)
    if job in ARTIFACTS:
        run.log_artifact(step_artifact(cfg, job, folder))
    wandb.finish()


def default_precision(cfg: DictConfig) -> str:
    """bf16 autocast on GPU, float32 on CPU, unless `trainer.precision` says otherwise."""
    if cfg.trainer.precision:
        return str(cfg.trainer.precision)
    return "bf16-mixed" if distributed.uses_gpu(cfg.trainer.accelerator) else "32-true"


def world_size(cfg: DictConfig) -> int:
    """Devices x nodes, as the Trainer will see it."""
    return distributed.planned_world_size(cfg.trainer.devices, int(cfg.trainer.num_nodes))


def make_trainer(
    cfg: DictConfig,
    run_dir: Path,
    *,
    max_steps: int = -1,
    max_epochs: Optional[int] = None,
    callbacks: Iterable[Any] = (),
    loggers: Optional[List[Any]] = None,
    plugins: Iterable[Any] = (),
    job: str = "",
    **overrides: Any,
):
    """A `lightning.Trainer` from `cfg.trainer` (ddp when several devices or nodes;
    gloo on CPU, NCCL on GPU, chosen by Lightning); `loggers` default to `make_loggers`
    for the step `job`.

    Every trainer gets `raptor.train.preemption.Preemption` (SIGTERM / SIGINT / SIGUSR1:
    checkpoint to `run_dir/checkpoints/last.ckpt`, then stop or requeue); in a SLURM job
    Lightning's own requeue handler is switched off (`SLURMEnvironment(auto_requeue=False)`)."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from raptor.train.preemption import Preemption

    t = cfg.trainer
    strategy = t.strategy
    slurm = SLURMEnvironment.detect()  # srun-started tasks (Lightning's own test)
    if strategy == "auto" and world_size(cfg) > 1:
        strategy = "ddp"
    kwargs = dict(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=default_precision(cfg),
        deterministic=t.deterministic,
        benchmark=t.benchmark,
        max_steps=max_steps,
        max_epochs=max_epochs if max_epochs is not None else -1,
        default_root_dir=str(run_dir),
        logger=loggers if loggers is not None else make_loggers(cfg, run_dir, job),
        callbacks=[*callbacks, Preemption(Path(run_dir) / CKPT_DIR / LAST_CKPT)],
        log_every_n_steps=cfg.logging.log_every_n_steps,
        enable_progress_bar=cfg.logging.progress_bar,
        use_distributed_sampler=False,  # webdataset splits by node and worker itself
        enable_model_summary=False,
        plugins=[*plugins, *([SLURMEnvironment(auto_requeue=False)] if slurm else [])],
    )
    kwargs.update(OmegaConf.to_container(t.extra, resolve=True))
    kwargs.update(overrides)
    return L.Trainer(**kwargs)
