"""Run folders, loggers and the Lightning Trainer every training command shares.

A run folder holds the resolved `config.yaml`, `metrics.csv` (always), the W&B
files when W&B is on (with the run id kept in `wandb_id.txt`, so a resumed or
requeued job continues the same W&B run), TensorBoard event files when
`logging.tensorboard` is on (read by `raptor dashboard`), `checkpoints/` (with
`last.ckpt`, the checkpoint a rerun resumes from) and PNG plots.
"""

from __future__ import annotations

import csv
import os
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


class _AppendingCSVWriter:
    """Mixin for Lightning's CSV writer: keep the interrupted run's `metrics.csv` and
    append to it (Lightning deletes it when the folder is reused, losing a resumed
    run's history)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = next(csv.reader(fh), [])


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows of `run_dir/metrics.csv` logged at `step` or later (rank 0): a run
    resumed from a checkpoint at `step` (0: a fresh start) logs them again."""
    path = Path(run_dir) / METRICS_FILE
    if not distributed.is_rank_zero() or not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        keys, rows = reader.fieldnames or [], list(reader)
    keep = [r for r in rows if int(r["step"]) < step]
    if len(keep) == len(rows):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)


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


def make_loggers(cfg: DictConfig, run_dir: Path) -> List[Any]:
    """CSV always (`run_dir/metrics.csv`); W&B when `logging.wandb` is online/offline;
    TensorBoard events (in `run_dir`) when `logging.tensorboard` is on."""
    loggers: List[Any] = [_csv_logger(run_dir)]
    if cfg.logging.tensorboard:
        require_tensorboard("logging.tensorboard=true")
        loggers.append(_tensorboard_logger(run_dir))
    mode = cfg.logging.wandb  # online | offline | disabled (checked by the schema)
    if mode != "disabled":
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        if wandb.run is not None:  # a previous step of this process: WandbLogger would reuse it
            wandb.finish()

        loggers.append(
            WandbLogger(
                project=cfg.logging.project,
                entity=cfg.logging.entity,
                name=cfg.logging.run_name or cfg.name,
                save_dir=str(run_dir),
                id=wandb_run_id(run_dir),
                resume="allow",
                offline=mode == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


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
    **overrides: Any,
):
    """A `lightning.Trainer` from `cfg.trainer` (ddp when several devices or nodes;
    gloo on CPU, NCCL on GPU, chosen by Lightning).

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
        logger=loggers if loggers is not None else make_loggers(cfg, run_dir),
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
