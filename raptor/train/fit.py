"""`raptor fit CONFIG stage=1|2 [key=value ...]`: two-stage Raptor distillation.

The teacher runs frozen, on the fly, on the same devices: every training batch
gets one teacher trajectory (B, L+1, T, D), shared by all the blocks trained.

Stage 1 (`train.stage=1`) trains each selected block (`train.blocks`, 1-based;
default all k) on its own phase (first..last), from the teacher's true phase
input a_{first-1}:
    loss_j = r * TF_j + (1 - r) * AR_j,   r = max(0, 1 - step / anneal_steps)
(`train.stage1.teacher_forcing`: `anneal`; the ablations `always` and `never` fix r at 1
and 0). TF_j predicts every layer of the phase in one step from the teacher's previous
layer (all layers in one block call); AR_j rolls the block out over the whole
phase with gradients through the rollout, mean over steps (`raptor.train.losses`).
The TF pass is skipped while r = 0, the AR pass while r = 1. The total loss is the sum over trained blocks
(their parameters are disjoint) and the gradient norm is clipped per block, so a
block trains the same alone (`train.blocks=[j]`, one job per block) or with the
others.
Stage 2 (`train.stage=2`) joins the blocks, initialised from stage-1 run folders
or checkpoints (`train.init_from`, comma-separated when blocks were trained in
separate jobs), and trains the AR loss from a_0 over all L layers with a fresh
optimizer and schedule; with `train.stages=[2]` (the ablation without stage 1) from
freshly initialised blocks instead, and train.init_from must be unset.

Per stage (`train.stage1` / `train.stage2`): AdamW on every trained parameter,
linear warmup over `warmup_steps` then cosine to `min_lr` at `steps`; the peak
lr is `lr`, or `lr * global_batch / lr_reference_batch` when `scale_lr` (linear
scaling rule, `raptor.train.schedules`; global batch = the data module's batch size
x devices x nodes; min_lr is not scaled). Gaussian input noise `noise_sigma` on
every block input, drawn from a generator seeded by (train.seed, stage, step,
rank), so a resumed run draws the same noise.

Logged metrics (CSV, W&B), layers l 1-based:
- train/loss (mean over ranks), train/r, train/lr, train/img_s (global images per
  second), per trained block j train/loss_B{j}, train/ar_B{j}, train/tf_B{j} (NaN while
  that pass is skipped);
- at validation, on the same batches for teacher and student, rows with
  valid=False ignored (`dmd.metrics.TrajectoryMetrics`, metrics r2, r2_ref,
  r2_affine, cos, rel_l2, norm_ratio): val/{metric}/L{l} over all tokens and
  val/{metric}_{group}/L{l} for group cls, reg, patch; val/{metric}/mean over
  layers; the identity baseline (a_l predicted as a_0) under val_identity/...;
  val/loss/L{l} (the training loss function per layer) and val/loss;
  val/top1_teacher and, when labels and a head exist, the teacher's head on the
  student's last layer: val/top1_student (stage 2: a_L rolled out from a_0) or,
  in stage 1, val/top1_student_B{j} (block j rolled out over its phase from the
  teacher's input, then the teacher's remaining blocks). Stage 1 validates the
  layers of the trained phases, each block from the teacher's phase input;
  stage 2 (and `raptor.eval.fidelity`) rolls the whole student out from a_0.
  val/complete is 0 (with a warning) when samples of the validation set were missing
  from their shards or skipped as bad, else 1 (a pass cut short by train.val_batches is
  partial by choice and not flagged).
The latest validation is also written to RUN/val_metrics.json.

Runs: RUN = cfg.run_dir; checkpoints in RUN/checkpoints/last.ckpt every
`train.ckpt_every_n_steps` and at the end (written atomically). A checkpoint is
first written as pending.ckpt and becomes last.ckpt only when the next step's
loss, computed from its weights, is finite (the final one: when training ends,
after its validation), so a resume never skips a validation and never starts
from weights known to fail. No checkpoint is written from NaN/inf weights or
optimizer state. Lightning writes each logged row to metrics.csv at once.
`train.resume`:
`auto` continues from RUN's last.ckpt (or a newer `hpc_ckpt_*.ckpt` left by
Lightning's SLURM requeue) when there is one (optimizer, schedule,
step, RNG, data stream position), `never` refuses a run folder that already has
one, a path resumes from that checkpoint. A resume drops the metrics.csv rows of
the checkpoint's step and later (the run logs them again), and refuses a changed
schedule (`schedule`: steps, lr, min_lr, warmup, anneal, weight decay, peak lr)
unless `train.schedule_change=apply`, which follows the new schedule from the
resumed step on. RUN/config.yaml is written once these checks pass. SIGTERM,
SIGINT and SLURM's SIGUSR1 save last.ckpt on every rank and stop the run (exit 143,
130, or 0 once requeued; see `raptor.train.preemption`); the final validation always
evaluates last.ckpt.
A non-finite loss or state stops the run (`NonFiniteLossError`, a `RunFailed`)
before the optimizer step, naming the step and the last good checkpoint with its
step, or saying that there is none.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig

from raptor.config import ConfigError, to_container
from raptor.data.stream import ShardDataModule
from raptor.errors import RunFailed
from raptor.eval.validation import Fidelity, block_losses
from raptor.model.partition import Partition
from raptor.model.raptor import Raptor
from raptor.model.teacher import Teacher
from raptor.train import losses
from raptor.train.checkpoints import (
    AtomicCheckpointIO,
    check_resume,
    first_non_finite,
    load_blocks,
    resume_path,
)
from raptor.train.runs import (
    CKPT_DIR,
    LAST_CKPT,
    make_trainer,
    prepare_run_dir,
    truncate_metrics,
    world_size,
)
from raptor.train.schedules import (
    anneal_steps,
    lr_at,
    peak_lr,
    schedule,
    stage_config,
    tf_ratio,
)

PENDING_CKPT = "pending.ckpt"
VAL_FILE = "val_metrics.json"


class NonFiniteLossError(RunFailed):
    """The training loss, or the state about to be checkpointed, became NaN or infinite."""


def selected_blocks(cfg: DictConfig, k: int) -> List[int]:
    """0-based indices of the blocks to train: `train.blocks` (1-based, stage 1 only) or all."""
    blocks = cfg.train.blocks
    if blocks is None:
        return list(range(k))
    if int(cfg.train.stage) != 1:
        raise ConfigError(
            "train.blocks selects stage-1 blocks; stage 2 trains all of them (unset it)"
        )
    out = [int(j) for j in blocks]
    if not out or any(not 1 <= j <= k for j in out) or len(set(out)) != len(out):
        raise ConfigError(
            f"train.blocks must be distinct block numbers in 1..{k} (model.k), got {out}"
        )
    return sorted(j - 1 for j in out)


# --------------------------------------------------------------------------- module


class Distiller(Fidelity):
    """One stage of Raptor distillation (see the module docstring), validated by
    `raptor.eval.validation.Fidelity`.

    teacher: a `raptor.model.teacher.Teacher` (frozen; its weights are left out of
    checkpoints); raptor: a `raptor.model.raptor.Raptor`; blocks: 0-based blocks to
    train (stage 1; the others are frozen and not validated). `rollout` picks the
    validation: "phase" (each trained block from the teacher's phase input; stage 1
    default) or "full" (the whole student from a_0; stage 2 default). `global_batch`:
    the images of one optimizer step over all ranks (the data's batch size x world
    size), which scales the lr (`raptor.train.schedules`); needed to train, not to validate.
    """

    def __init__(
        self,
        cfg: DictConfig,
        teacher: Any,
        raptor: Any,
        blocks: Optional[List[int]] = None,
        rollout: Optional[str] = None,
        global_batch: Optional[int] = None,
    ) -> None:
        stage, stage_cfg = int(cfg.train.stage), stage_config(cfg)
        super().__init__(
            teacher,
            raptor,
            block_losses(stage_cfg, stage, teacher.groups, raptor),
            blocks,
            rollout or ("phase" if stage == 1 else "full"),
        )
        self.cfg = cfg
        self.global_batch = global_batch
        self.stage = stage
        self.stage_cfg = stage_cfg
        for j, block in enumerate(raptor.blocks):
            block.requires_grad_(j in self.trained)
        self.anneal_steps = anneal_steps(self.stage_cfg)
        self.teacher_forcing = str(self.stage_cfg.teacher_forcing)
        self.save_hyperparameters(
            {
                "config": to_container(cfg),
                "arch": raptor.arch_config(),
                "stage": self.stage,
                "blocks": [j + 1 for j in self.trained],
            },
            logger=False,
        )
        self._tick: Optional[float] = None
        # the newest checkpoint known good (path, step), and the step of pending.ckpt
        self.good_ckpt: Optional[tuple[Path, int]] = None
        self.pending_step: Optional[int] = None

    # ---------------------------------------------------------------- optimisation

    def _lr_schedule(self) -> tuple[float, float, int, int]:
        """(peak, min_lr, warmup, total): the arguments of `lr_at` for this config."""
        peak = peak_lr(self.stage_cfg, self._global_batch())
        return (
            peak,
            float(self.stage_cfg.min_lr),
            int(self.stage_cfg.warmup_steps),
            int(self.stage_cfg.steps),
        )

    def _global_batch(self) -> int:
        if self.global_batch is None:
            raise ValueError("Distiller: training needs global_batch (images per optimizer step)")
        return int(self.global_batch)

    def configure_optimizers(self):
        peak, min_lr, warmup, total = self._lr_schedule()
        params = [p for p in self.raptor.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=peak, weight_decay=float(self.stage_cfg.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, peak, min_lr, warmup, total) / peak
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """Set the restored optimizer and scheduler to this config's schedule at the resumed
        step (a no-op unless `train.schedule_change=apply` let the schedule change)."""
        peak, min_lr, warmup, total = self._lr_schedule()
        opt = self.trainer.optimizers[0]
        self.trainer.lr_scheduler_configs[0].scheduler.base_lrs = [peak] * len(opt.param_groups)
        lr = lr_at(self.global_step, peak, min_lr, warmup, total)
        for group in opt.param_groups:
            group.update(lr=lr, initial_lr=peak, weight_decay=float(self.stage_cfg.weight_decay))

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        """Stage 1 clips each trained block's gradient norm on its own; stage 2 all together."""
        if not gradient_clip_val:
            return
        groups = (
            [self.raptor.blocks[j].parameters() for j in self.trained]
            if self.stage == 1
            else [self.raptor.parameters()]
        )
        for params in groups:
            torch.nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], gradient_clip_val
            )

    def _noise(self) -> Optional[torch.Generator]:
        """A generator seeded by (seed, stage, step, rank): reproducible noise across resumes."""
        if not self.stage_cfg.noise_sigma:
            return None
        seed = hash((int(self.cfg.train.seed), self.stage, self.global_step, self.global_rank))
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    # ---------------------------------------------------------------- training

    def training_step(
        self, batch: Dict[str, torch.Tensor], batch_idx: int
    ) -> Dict[str, torch.Tensor]:
        """{"loss", "trajectory" (the teacher's, shared with callbacks)}."""
        images = batch["image"]
        B, sigma, gen = images.shape[0], float(self.stage_cfg.noise_sigma), self._noise()
        logs: Dict[str, torch.Tensor | float] = {}
        if self.stage == 1:
            r = tf_ratio(self.global_step, self.anneal_steps, self.teacher_forcing)
            upto = max(self.raptor.phases[j][1] for j in self.trained)
            traj = self.teacher.trajectory(images, upto=upto)
            loss = images.new_zeros(())
            for j in self.trained:
                first, last = self.raptor.phases[j]
                block, targets = self.raptor.blocks[j], traj[:, first : last + 1]
                # a skipped pass is logged as NaN (Lightning would repeat the last value)
                ar, tf, loss_j = math.nan, math.nan, images.new_zeros(())
                if r < 1:
                    ar, _ = losses.autoregressive_loss(
                        block, traj[:, first - 1], targets, first, self.loss_fns[j], sigma, gen
                    )
                    loss_j = (1.0 - r) * ar
                    ar = ar.detach()
                if r > 0:
                    tf = losses.teacher_forcing_loss(
                        block,
                        traj[:, first - 1 : last],
                        targets,
                        first,
                        self.loss_fns[j],
                        sigma,
                        gen,
                    )
                    loss_j = loss_j + r * tf
                    tf = tf.detach()
                logs[f"train/tf_B{j + 1}"] = tf
                logs[f"train/ar_B{j + 1}"] = ar
                logs[f"train/loss_B{j + 1}"] = loss_j.detach()
                loss = loss + loss_j
            self.log("train/r", r, prog_bar=True, batch_size=B)
        else:
            traj = self.teacher.trajectory(images)
            loss, _ = losses.autoregressive_loss(
                self.raptor.step, traj[:, 0], traj[:, 1:], 1, self.loss_fns[-1], sigma, gen
            )
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            if self.pending_step is not None and self.trainer.is_global_zero:
                self._ckpt(PENDING_CKPT).unlink(missing_ok=True)  # the weights that gave it
            raise NonFiniteLossError(
                f"non-finite training loss at step {self.global_step} (stage {self.stage}); "
                f"stopped before the optimizer step. {self._resume_hint()}"
            )
        if self.pending_step is not None:  # its weights gave a finite loss: keep it
            self._promote_pending()
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=True, batch_size=B)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=B)
        self.log_dict(logs, batch_size=B)
        return {"loss": loss, "trajectory": traj}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._tick is not None:
            global_batch = batch["image"].shape[0] * self.trainer.world_size
            self.log("train/img_s", global_batch / max(now - self._tick, 1e-9), prog_bar=True)
        self._tick = now

    # ---------------------------------------------------------------- checkpoints

    def _ckpt(self, name: str) -> Path:
        return Path(self.trainer.default_root_dir) / CKPT_DIR / name

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every `train.ckpt_every_n_steps` steps and after the last, checkpoint to
        pending.ckpt (here, like Lightning's ModelCheckpoint, so that a resume restores the
        step counters exactly); the next training step, or the end of training, makes it
        last.ckpt."""
        step = self.global_step
        if step % int(self.cfg.train.ckpt_every_n_steps) == 0 or step == self.trainer.max_steps:
            self.trainer.save_checkpoint(self._ckpt(PENDING_CKPT), weights_only=False)
            self.pending_step = step

    def on_train_end(self) -> None:
        if self.pending_step is not None:
            self._promote_pending()

    def _promote_pending(self) -> None:
        """pending.ckpt -> last.ckpt."""
        last = self._ckpt(LAST_CKPT)
        if self.trainer.is_global_zero:
            os.replace(self._ckpt(PENDING_CKPT), last)
        self.good_ckpt, self.pending_step = (last, self.pending_step), None

    def _resume_hint(self) -> str:
        """Which checkpoint a rerun can continue from, with its step, and what to change."""
        lr = f"train.stage{self.stage}.lr"
        if self.good_ckpt is None:
            return (
                "No checkpoint of this run exists yet: lower "
                f"{lr} or check the data, then run again (the run folder can be reused)."
            )
        path, step = self.good_ckpt
        how = "train.resume=auto" if path == self._ckpt(LAST_CKPT) else f"train.resume={path}"
        return (
            f"Last good checkpoint: {path} (step {step}); to continue from it ({how}), lower "
            f"{lr} with train.schedule_change=apply, or fix the data."
        )

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Refuse NaN/inf weights or optimizer state; drop the teacher's weights (rebuilt
        from the config); keep the RNG states and the schedule followed."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
        }
        bad = first_non_finite(checkpoint)  # the same on every rank (DDP keeps them equal)
        if bad is not None:
            raise NonFiniteLossError(
                f"non-finite {bad} at step {self.global_step} "
                f"(stage {self.stage}): no checkpoint written. {self._resume_hint()}"
            )
        checkpoint["schedule"] = schedule(self.cfg, self._global_batch())
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["state_dict"].update(
            {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        )
        rng = checkpoint.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


# --------------------------------------------------------------------------- runs


def build(cfg: DictConfig, resuming: bool = False):
    """Teacher, Raptor (stage 2: initialised from `train.init_from` unless resuming) and
    the trained blocks for this config."""
    teacher = Teacher.from_config(cfg.teacher)
    raptor = Raptor.from_config(cfg.model, teacher, Partition.from_config(cfg, teacher.num_layers))
    blocks = selected_blocks(cfg, raptor.k)
    stage, stages = int(cfg.train.stage), sorted(set(cfg.train.stages))
    if stage not in stages:
        raise ConfigError(f"train.stage={stage} is not one of train.stages={stages}")
    if stage == 2 and 1 not in stages and cfg.train.init_from:
        raise ConfigError(
            "train.stages=[2] trains stage 2 from fresh blocks, but train.init_from is set: "
            "unset it, or include stage 1 (train.stages=[1,2])"
        )
    if stage == 2 and not resuming:
        if cfg.train.init_from:
            load_blocks(raptor, str(cfg.train.init_from))
        elif 1 in stages:
            warnings.warn(
                "stage 2 without train.init_from: the blocks start from random init "
                "(train.stages=[2] says so on purpose)",
                stacklevel=2,
            )
    return teacher, raptor, blocks


def _callbacks(cfg: DictConfig, partition: Partition) -> List[Any]:
    """The DMD callback in stage 2 when enabled, one span per phase unless dmd.spans says
    otherwise (the Distiller writes its own checkpoints)."""
    if int(cfg.train.stage) == 2 and cfg.dmd.enabled:
        from dmd.callback import DMDCallback

        return [DMDCallback.from_config(cfg.dmd, default_spans=partition.spans)]
    return []


def fit(
    cfg: DictConfig, run_dir: Optional[str | Path] = None, datamodule: Any = None
) -> Dict[str, Any]:
    """Train one stage (cfg.train.stage) in `run_dir` (default cfg.run_dir).

    `datamodule` defaults to `raptor.data.stream.ShardDataModule(cfg.data, teacher.data_config)`;
    its `batch_size` (per rank) x the world size is the global batch that scales the lr.
    Returns {"run_dir", "checkpoint" (last.ckpt), "stage", "step", "metrics" (every value
    logged by the last validation: val/..., val_identity/..., val_dmd/... with the DMD
    callback)}. A signal stops it with `raptor.train.preemption.Stopped` (a SystemExit).
    """
    stage_cfg = stage_config(cfg)
    run_dir = Path(run_dir or cfg.run_dir)
    ckpt_path = resume_path(cfg, run_dir)
    L.seed_everything(int(cfg.train.seed), verbose=False)
    teacher, raptor, blocks = build(cfg, resuming=ckpt_path is not None)
    if datamodule is None:
        datamodule = ShardDataModule(cfg.data, teacher.data_config, teacher.num_classes)
    world = world_size(cfg)
    global_batch = int(datamodule.batch_size) * world
    start = check_resume(cfg, ckpt_path, global_batch, world)
    run_dir = prepare_run_dir(cfg, run_dir)  # config.yaml: only once the run can start
    truncate_metrics(run_dir, start)  # what this run logs again
    module = Distiller(cfg, teacher, raptor, blocks, global_batch=global_batch)
    module.val_file = run_dir / VAL_FILE
    module.good_ckpt = (ckpt_path, start) if ckpt_path is not None else None
    steps = int(stage_cfg.steps)
    trainer = make_trainer(
        cfg,
        run_dir,
        max_steps=steps,
        callbacks=_callbacks(cfg, raptor.partition),
        gradient_clip_val=float(stage_cfg.grad_clip) or None,
        val_check_interval=max(1, min(int(cfg.train.val_every_n_steps), steps)),
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.train.val_batches if cfg.train.val_batches is not None else 1.0,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # the Distiller checkpoints (pending -> last)
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if module.last_val_step != trainer.global_step:  # the final weights, never an hpc_ckpt
            last = run_dir / CKPT_DIR / LAST_CKPT
            trainer.validate(module, datamodule=datamodule, ckpt_path=last, verbose=False)
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(run_dir / CKPT_DIR / LAST_CKPT),
        "stage": int(cfg.train.stage),
        "step": int(trainer.global_step),
        "metrics": {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")
        },
    }


__all__ = ["Distiller", "NonFiniteLossError", "fit"]
