"""`raptor teacher CONFIG [key=value ...]`: train a small ViT teacher from scratch.

The Raptor paper's small-scale experiments train their own ViTs with
stochastic depth (`teacher.drop_path_rate`), which strengthens the
block-recurrent structure that Raptor distils. This trains
`timm.create_model(teacher.name, **architecture keys)` on labelled shards
(`raptor.data.stream.ShardDataModule`) with AdamW, linear warmup then cosine decay
(per step), label smoothing, and reports validation top-1 every epoch.

Run folder (`run_dir`): config.yaml, metrics.csv, checkpoints/ (resumable: a
rerun continues from checkpoints/last.ckpt, which SIGTERM / SIGINT / SIGUSR1 also
save before the run stops, see `raptor.train.preemption`), and at the end
`teacher.safetensors` (weights + architecture + data config; `teacher.weights=`
this file rebuilds the teacher) and `teacher.json` {"val_top1", "val_complete",
"weights"}; val_complete (logged as val/complete) is false when validation samples were
missing from their shards or skipped as bad, so val_top1 is not over the full set.
When teacher.json exists the run is complete and is not repeated unless
`--retrain` (then the old checkpoints and results are replaced).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from raptor import distributed
from raptor.config import ConfigError
from raptor.data.shards import ensure_shards
from raptor.errors import UserError, read_json
from raptor.model.teacher import create_vit, default_data_config, save_teacher_file
from raptor.run_folders import TEACHER_FILE
from raptor.train.runs import CKPT_DIR, LAST_CKPT, make_trainer, prepare_run_dir, truncate_metrics

RESULT_FILE = "teacher.json"


class TeacherTraining(L.LightningModule):
    """Supervised training of a timm ViT classifier on batches {image, label, valid}.

    Rows with valid=False (validation padding) or label < 0 are ignored;
    a training batch without any labelled row is an error (unlabelled shards)."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.vit, self.arch = create_vit(cfg.teacher)
        if self.vit.num_classes <= 0:
            raise ConfigError("teacher.num_classes must be > 0 to train a teacher from scratch")
        from torchmetrics.aggregation import MeanMetric, SumMetric
        from torchmetrics.classification import MulticlassAccuracy

        self.val_top1 = MulticlassAccuracy(num_classes=self.vit.num_classes, average="micro")
        self.val_loss = MeanMetric()  # cross-entropy per validation sample
        self.val_missing = SumMetric()  # validation samples the data could not deliver

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)

    @staticmethod
    def _labelled(batch: Dict[str, torch.Tensor]):
        keep = batch["valid"] & (batch["label"] >= 0)
        return batch["image"][keep], batch["label"][keep]

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = self._labelled(batch)
        if labels.numel() == 0:
            raise UserError(
                "teacher training needs labelled shards: a training batch has no sample with "
                "label >= 0 (check data.train_urls / data.shards_dir)"
            )
        logits = self.vit(images)
        loss = F.cross_entropy(
            logits, labels, label_smoothing=self.cfg.teacher.train.label_smoothing
        )
        acc = (logits.argmax(-1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.numel())
        self.log("train/top1", acc, batch_size=labels.numel())
        return loss

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        if "missing" in batch:
            self.val_missing.update(batch["missing"])
        images, labels = self._labelled(batch)
        if labels.numel() == 0:  # padding-only batch (equal batch counts across ranks)
            return
        logits = self.vit(images)
        self.val_top1.update(logits, labels)
        self.val_loss.update(F.cross_entropy(logits, labels, reduction="none"))

    def on_validation_epoch_end(self) -> None:
        """The metrics over every rank's samples, computed on every rank: a rank may have
        had only padding batches (one validation shard and two ranks), and a value logged
        by some ranks only would leave the others waiting in its reduction forever."""
        from raptor.data.stream import validation_complete

        for name, metric in (("val/loss", self.val_loss), ("val/top1", self.val_top1)):
            self.log(name, metric.compute(), prog_bar=name == "val/top1", sync_dist=True)
            metric.reset()
        missing = int(self.val_missing.compute())
        self.val_missing.reset()
        self.log("val/complete", float(validation_complete(missing, "val top-1")))

    def configure_optimizers(self):
        from timm.optim import param_groups_weight_decay

        tc = self.cfg.teacher.train
        groups = param_groups_weight_decay(
            self.vit, tc.weight_decay, no_weight_decay_list=self.vit.no_weight_decay()
        )
        opt = torch.optim.AdamW(groups, lr=tc.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(total - 1, total * tc.warmup_epochs // max(1, tc.epochs))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear from 1/(warmup+1) to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _data_cfg(cfg: DictConfig) -> DictConfig:
    """cfg.data for teacher training: labels required, `teacher.train.batch_size` applied."""
    data = copy.deepcopy(cfg.data)
    data.require_labels = True
    if cfg.teacher.train.batch_size:
        data.batch_size = int(cfg.teacher.train.batch_size)
    return data


def train_teacher(
    cfg: DictConfig, run_dir: Optional[str | Path] = None, retrain: bool = False
) -> Dict[str, Any]:
    """Train the teacher described by cfg.teacher on cfg.data; returns
    {"val_top1": float, "weights": path to teacher.safetensors}.

    A run folder that already holds teacher.json is returned as is (unless `retrain`)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from raptor.data.stream import ShardDataModule

    run_dir = Path(run_dir or cfg.run_dir)
    result_path = run_dir / RESULT_FILE
    if result_path.is_file() and not retrain:
        result = read_json(result_path, "teacher result")
        if distributed.is_rank_zero():
            print(
                f"raptor teacher: already trained ({result_path}), val top-1 {result['val_top1']:.4f}"
            )
        return result
    ckpt_dir = run_dir / CKPT_DIR
    if retrain:
        for old in (result_path, run_dir / TEACHER_FILE):
            old.unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    prepare_run_dir(cfg, run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = TeacherTraining(cfg)
    cfg = ensure_shards(cfg, run_dir / "shards")
    data = ShardDataModule(_data_cfg(cfg), default_data_config(module.vit), module.vit.num_classes)
    epochs = int(cfg.teacher.train.epochs)
    checkpoint = ModelCheckpoint(
        dirpath=str(ckpt_dir),
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        save_top_k=1,
        save_last=True,
    )
    trainer = make_trainer(
        cfg,
        run_dir,
        max_epochs=epochs,
        callbacks=[checkpoint, LearningRateMonitor("step")],
        num_sanity_val_steps=0,
        job="teacher",
    )
    last = ckpt_dir / LAST_CKPT
    if last.is_file():  # the rows an interrupted epoch logged after it are logged again
        truncate_metrics(
            run_dir, int(torch.load(last, weights_only=True, mmap=True)["global_step"])
        )
    else:
        truncate_metrics(run_dir, 0)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
    metrics = trainer.callback_metrics
    if metrics.get("val/top1") is None:  # resumed a finished run: nothing was fitted, evaluate once
        metrics = trainer.validate(module, datamodule=data, ckpt_path=last, verbose=False)[0]
    result = {
        "val_top1": float(metrics["val/top1"]),
        "val_complete": float(metrics["val/complete"]) == 1.0,
        "weights": str(run_dir / TEACHER_FILE),
    }
    if trainer.is_global_zero:
        save_teacher_file(result["weights"], module.vit, module.arch, data.transform_config)
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        incomplete = "" if result["val_complete"] else " (INCOMPLETE: samples missing)"
        print(
            f"raptor teacher: val top-1 {result['val_top1']:.4f}{incomplete} after {epochs} epochs "
            f"-> {result['weights']}"
        )
    return result
