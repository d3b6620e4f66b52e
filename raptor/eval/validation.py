"""Validation of a Raptor against its teacher on the same batches: the `Fidelity` module.

On every validation batch the teacher's trajectory is computed once and the student
predicts the validated layers: "full" rolls the whole student out from a_0 over all
L layers; "phase" rolls each trained block out over its phase from the teacher's
phase input. Rows with valid=False are ignored. Per validated layer l (1-based):
- the student's `dmd.metrics.TrajectoryMetrics` (r2, r2_ref, r2_affine, cos, rel_l2,
  norm_ratio, over all tokens and per group) and the identity baseline's (a_l predicted as a_0);
- the training loss function of the layer's block (`block_losses`);
- top-1 of the teacher's head on the teacher's a_L and on the student's last state of
  each rollout (finished through the teacher's remaining blocks), with labels >= 0.

Logged at the end of each pass: val/{metric}/L{l} (all tokens), val/{metric}_{group}/L{l},
val/{metric}/mean, the same under val_identity/, val/loss/L{l}, val/loss, val/top1_teacher,
val/top1_student (full) or val/top1_student_B{j} (phase), val/complete.
The training module's Distiller trains on top of this module; `raptor.eval.fidelity`
validates with it alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric

from dmd.metrics import FidelityTable, TrajectoryMetrics
from dmd.stream import through_teacher
from raptor.data.stream import validation_complete
from raptor.train import losses
from raptor.train.runs import log_fidelity


def block_losses(stage_cfg: Any, stage: int, groups: Dict[str, slice], raptor: Any) -> List[Any]:
    """One loss function per block of `raptor`, from a `train.stage{1,2}` section
    (`weighted_final` differs by block in stage 1)."""
    weights = {"cls": stage_cfg.w_cls, "reg": stage_cfg.w_reg, "patch": stage_cfg.w_patch}
    return [
        losses.make_loss(
            str(stage_cfg.loss),
            groups,
            weights,
            final_phase=stage == 2 or last == raptor.num_layers,
        )
        for _, last in raptor.phases
    ]


class MeanVector(Metric):
    """Mean over rows of (N, n) values, summed across updates and DDP ranks; NaN if no rows."""

    full_state_update = False

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.to(torch.float64).sum(0)
        self.count += values.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count if self.count > 0 else torch.full_like(self.total, math.nan)


class Fidelity(L.LightningModule):
    """Validates `raptor` against `teacher` (see the module docstring).

    teacher: a `raptor.model.teacher.Teacher`; raptor: a `raptor.model.raptor.Raptor`;
    loss_fns: one loss function per block (`block_losses`); blocks: 0-based blocks
    validated by the "phase" rollout (default all); rollout: "full" or "phase".
    After each pass: `results` (structured, the same on every rank), `last_val` (the
    logged values), `fidelity_table` (the student's `FidelityTable`), and the results
    written to `val_file` when set.
    """

    def __init__(
        self,
        teacher: Any,
        raptor: Any,
        loss_fns: List[Any],
        blocks: Optional[List[int]] = None,
        rollout: str = "full",
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.raptor = raptor
        self.loss_fns = loss_fns
        self.trained = list(range(raptor.k)) if blocks is None else sorted(blocks)
        self.rollout_mode = rollout
        # validated layers: all of them (full rollout) or those of the trained phases
        if self.rollout_mode == "full":
            self.val_layers = list(range(1, raptor.num_layers + 1))
        else:
            self.val_layers = [
                layer
                for j in self.trained
                for layer in range(raptor.phases[j][0], raptor.phases[j][1] + 1)
            ]
        S, D = len(self.val_layers), teacher.embed_dim
        self.val_student = TrajectoryMetrics(S, teacher.groups, dim=D)
        self.val_identity = TrajectoryMetrics(S, teacher.groups, dim=D)
        self.val_loss = MeanVector(S)
        self.top1_names = ["teacher"] + (
            ["student"]
            if self.rollout_mode == "full"
            else [f"student_B{j + 1}" for j in self.trained]
        )
        self.val_top1 = MeanVector(len(self.top1_names))
        self.val_missing = SumMetric()  # validation samples the data could not deliver
        self.last_val: Dict[str, float] = {}
        self.results: Dict[str, Any] = {}
        self.fidelity_table: Optional[FidelityTable] = None
        self.val_file: Optional[Path] = None  # where to write the latest validation (JSON)
        self.last_val_step: Optional[int] = None

    def student_predictions(self, traj: torch.Tensor) -> tuple[torch.Tensor, List[torch.Tensor]]:
        """Student states for `val_layers` (B, S, T, D), and the state each top-1 reads."""
        if self.rollout_mode == "full":
            preds = self.raptor(traj[:, 0])
            return preds, [preds[:, -1]]
        parts = [
            self.raptor.rollout(traj[:, f - 1], f - 1, e)
            for f, e in (self.raptor.phases[j] for j in self.trained)
        ]
        return torch.cat(parts, dim=1), [p[:, -1] for p in parts]

    def validation_step(
        self, batch: Dict[str, torch.Tensor], batch_idx: int
    ) -> Dict[str, torch.Tensor]:
        """Student vs teacher on one batch; returns {"trajectory"} so callbacks (DMD) reuse
        the teacher's forward."""
        traj, valid, labels = through_teacher(batch, self.teacher.trajectory, self.device)
        layers = torch.tensor(self.val_layers, device=traj.device)
        targets = traj[:, layers]
        preds, finals = self.student_predictions(traj)
        preds = preds.float()
        self.val_student.update(preds, targets, valid)
        self.val_identity.update(traj[:, :1].expand_as(targets), targets, valid)
        per_layer = [
            self.loss_fns[self.raptor.block_of(layer)](preds[:, i], targets[:, i])
            for i, layer in enumerate(self.val_layers)
        ]
        self.val_loss.update(torch.stack(per_layer, dim=1)[valid])
        if "missing" in batch:
            self.val_missing.update(batch["missing"])
        if self.teacher.num_classes:
            keep = valid & (labels >= 0)
            L_ = self.raptor.num_layers
            ends = (
                [L_]
                if self.rollout_mode == "full"
                else [self.raptor.phases[j][1] for j in self.trained]
            )
            hits = [
                self.teacher.logits_from_tokens(self.teacher.final_norm(traj[:, L_])).argmax(-1)
            ]
            for a, end in zip(finals, ends):
                hits.append(self.teacher.finish(a.float(), end)["logits"].argmax(-1))
            correct = torch.stack([h == labels for h in hits], dim=1)[keep]
            self.val_top1.update(correct)
        return {"trajectory": traj}

    def on_validation_epoch_end(self) -> None:
        flat, self.results = self.compute_validation()
        self.log_dict(flat)
        self.last_val = {k: float(v) for k, v in flat.items()}
        self.last_val_step = int(self.global_step)
        log_fidelity(self.loggers, self.fidelity_table, self.last_val_step, self.headline())
        if self.val_file is not None and self.trainer.is_global_zero:
            self.val_file.write_text(
                json.dumps({"step": self.last_val_step, **self.results}, indent=1)
            )

    def headline(self) -> Dict[str, float]:
        """The latest validation's headline numbers (the W&B run summary): R^2 at the last
        validated layer per token group (final/r2_{group}), the student's top-1 over the
        teacher's (final/top1_ratio, full rollout with labels) and the training images/s."""
        table, val = self.fidelity_table, self.last_val
        out = {f"final/r2_{g}": float(table.get("r2", g)[-1]) for g in table.groups}
        if val.get("val/top1_teacher") and "val/top1_student" in val:
            out["final/top1_ratio"] = val["val/top1_student"] / val["val/top1_teacher"]
        img_s = self.trainer.callback_metrics.get("train/img_s")
        if img_s is not None:
            out["final/img_s"] = float(img_s)
        return out

    def compute_validation(self) -> tuple[Dict[str, float], Dict[str, Any]]:
        """(flat logged metrics, structured results) of the validation so far; resets the
        metrics and keeps the student's table in `fidelity_table`."""
        student = self.val_student.table(self.val_layers)
        identity = self.val_identity.table(self.val_layers)
        loss, top1 = self.val_loss.compute(), self.val_top1.compute()
        flat = {**student.flat("val", mean=True), **identity.flat("val_identity", mean=True)}
        results: Dict[str, Any] = {
            "layers": self.val_layers,
            "student": student.to_json(),
            "identity": identity.to_json(),
        }
        results["loss"] = [float(x) for x in loss]
        for i, layer in enumerate(self.val_layers):
            flat[f"val/loss/L{layer}"] = float(loss[i])
        flat["val/loss"] = float(loss.mean())
        results["images"] = int(self.val_loss.count)
        results["top1"] = None
        if self.teacher.num_classes and int(self.val_top1.count) > 0:
            results["top1"] = {n: float(v) for n, v in zip(self.top1_names, top1)}
            flat.update({f"val/top1_{n}": float(v) for n, v in zip(self.top1_names, top1)})
        results["missing"] = int(self.val_missing.compute())
        results["complete"] = validation_complete(results["missing"], "top-1 and all metrics")
        flat["val/complete"] = float(results["complete"])
        for m in (
            self.val_student,
            self.val_identity,
            self.val_loss,
            self.val_top1,
            self.val_missing,
        ):
            m.reset()
        self.fidelity_table = student
        return flat, results


__all__ = ["Fidelity", "MeanVector", "block_losses"]
