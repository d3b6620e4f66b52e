"""DMDCallback in a real Lightning run: DMD, identity and student metrics side by side."""

import lightning as L
import pytest
import torch
from conftest import make_vit, read_csv
from torch import nn
from torch.utils.data import DataLoader

from dmd import MomentAccumulator, fit, trajectory_metrics
from dmd.callback import COMPARE_FILE, DMDCallback
from raptor.model.teacher import Teacher

SPANS = [(0, 2), (2, 2)]  # (i, p): the phases 1-2 and 3-4 of the 4 layers


def _teacher():
    vit = make_vit(
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=4,
        num_heads=2,
        reg_tokens=1,
        num_classes=3,
        class_token=True,
        no_embed_class=True,
    )
    return Teacher(vit)


def _batches(n, seed, batch_size=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    rows = [
        {"image": images[k], "label": labels[k], "valid": torch.tensor(k % 5 != 4)}
        for k in range(n)
    ]
    return DataLoader(rows, batch_size=batch_size)


class Student(L.LightningModule):
    """One linear map per layer, teacher-forced; logs val/{metric}[_{group}]/L{l} and keeps
    its table for the callback's comparison."""

    def __init__(self):
        super().__init__()
        self.teacher = _teacher()
        D, Lyr = self.teacher.embed_dim, self.teacher.num_layers
        self.maps = nn.ModuleList(nn.Linear(D, D) for _ in range(Lyr))
        from dmd import TrajectoryMetrics

        self.val_metrics = TrajectoryMetrics(Lyr, self.teacher.groups, dim=D)

    def _preds(self, traj):
        return torch.stack([m(traj[:, j]) for j, m in enumerate(self.maps)], 1)

    def training_step(self, batch, _):
        traj = self.teacher.trajectory(batch["image"])
        return (self._preds(traj) - traj[:, 1:]).square().mean()

    def validation_step(self, batch, _):
        traj = self.teacher.trajectory(batch["image"])
        self.val_metrics.update(self._preds(traj), traj[:, 1:], batch["valid"])

    def on_validation_epoch_end(self):
        self.fidelity_table = self.val_metrics.table(range(1, self.teacher.num_layers + 1))
        self.val_metrics.reset()
        self.log_dict(self.fidelity_table.flat("val"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.maps.parameters(), lr=0.01)

    def train_dataloader(self):
        return _batches(24, seed=1)

    def val_dataloader(self):
        return _batches(10, seed=2)


def test_lightning_run_logs_dmd_identity_and_student_side_by_side(tmp_path):
    student = Student()
    callback = DMDCallback(SPANS, solvers=["ridge", "rrr"], rank=8, alpha=1e-3, calib_images=18)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(student)

    # calibration used the first 18 valid training images (every 5th row is invalid)
    assert callback.moments.images == 18
    # (ReplaceMe, a default selection, also reads block 2's MLP output for span (2, 2))
    ref = MomentAccumulator(4, 16, endpoints=[(0, 2), (2, 4)], mlp_spans=[(2, 2)])
    for batch in student.train_dataloader():
        keep = batch["valid"] & (torch.cumsum(batch["valid"], 0) <= 18 - ref.images)
        t, m = student.teacher.trajectory(batch["image"], mlp_out=True)
        ref.update(t, keep, m)
        if ref.images >= 18:
            break
    assert ref.images == 18 and torch.allclose(ref.buffer, callback.moments.buffer, rtol=1e-10)

    rows = [r for r in read_csv(tmp_path / "metrics.csv") if r.get("val/cos/L3")]
    assert len(rows) == 2  # two validations
    for row in rows:
        for key in (
            "val/cos/L3",
            "val_dmd/span_rrr/cos/L3",
            "val_dmd/anchor_ridge/r2/L4",
            "val_dmd/identity/cos/L3",
            "val_dmd/endpoint_rrr/cos/L4",
            "val_dmd/span_ridge/top1/L4",
            "val_dmd/span_ridge/final_cos/L2",
        ):
            assert row[key] != "", key

    # the logged numbers are those of the same validation batches, recomputed here
    traj, mlp, valid = [], [], []
    for batch in student.val_dataloader():
        t, m = student.teacher.trajectory(batch["image"], mlp_out=True)
        traj.append(t)
        mlp.append(m)
        valid.append(batch["valid"])
    traj, mlp, valid = torch.cat(traj), torch.cat(mlp), torch.cat(valid)
    ident = trajectory_metrics(traj[:, [0, 0, 2, 2]], traj[:, 1:], student.teacher.groups, valid)
    for layer in range(1, 5):
        assert float(rows[-1][f"val_dmd/identity/cos/L{layer}"]) == pytest.approx(
            float(ident["cos/all"][layer - 1]), rel=1e-5
        )
    op = fit(ref, (2, 2), "span", "rrr", rank=8, alpha=1e-3)
    pred = op.predict(traj[:, 2], 2).transpose(1, 2)
    span = trajectory_metrics(pred, traj[:, 3:], student.teacher.groups, valid)
    assert float(rows[-1]["val_dmd/span_rrr/r2/L4"]) == pytest.approx(
        float(span["r2/all"][1]), rel=1e-4
    )
    # ReplaceMe: span (2, 2) only (no block before span (0, 2)), scored at its end layer
    rm = fit(ref, (2, 2), "replaceme", "ridge", alpha=1e-3)
    pred = rm.predict(traj[:, 2], 1, mlp[:, 1]).transpose(1, 2)
    score = trajectory_metrics(pred, traj[:, 4:5], student.teacher.groups, valid)
    assert float(rows[-1]["val_dmd/replaceme_ridge/r2/L4"]) == pytest.approx(
        float(score["r2/all"][0]), rel=1e-4
    )
    assert "val_dmd/replaceme_ridge/r2/L2" not in rows[-1]
    # top-1 of the span-end prediction finished through the teacher, vs the labels
    labels = torch.cat([b["label"] for b in student.val_dataloader()])
    end = fit(ref, (0, 2), "span", "ridge", alpha=1e-3).predict(traj[:, 0], 2)[..., -1, :]
    logits = student.teacher.finish(end.float(), 2)["logits"]
    acc = (logits.argmax(-1) == labels)[valid].double().mean()
    assert float(rows[-1]["val_dmd/span_ridge/top1/L2"]) == pytest.approx(float(acc))

    # comparison table: student, every variant and identity at the same step and layers
    table = read_csv(tmp_path / COMPARE_FILE)
    steps = sorted({int(r["step"]) for r in table})
    assert steps == [2, 4]
    last = [r for r in table if int(r["step"]) == 4 and r["group"] == "all" and r["layer"] == "3"]
    by = {r["predictor"]: r for r in last}
    assert {"student", "span_ridge", "span_rrr", "anchor_ridge", "anchor_rrr", "identity"} <= set(
        by
    )
    assert float(by["student"]["cos"]) == pytest.approx(float(rows[-1]["val/cos/L3"]), rel=1e-6)
    # the student's rows are its own table (float64), not the logged (float32) values
    for m in ("cos", "r2", "rel_l2"):
        assert float(by["student"][m]) == student.fidelity_table.get(m)[2]
    cls = [r for r in table if int(r["step"]) == 4 and r["group"] == "cls" and r["layer"] == "2"]
    assert (
        float(next(r for r in cls if r["predictor"] == "student")["r2"])
        == (student.fidelity_table.get("r2", "cls")[1])
    )
    assert float(by["identity"]["r2"]) == pytest.approx(float(ident["r2/all"][2]), rel=1e-5)
    for name in ("dmd_eigenvalues", "dmd_vs_student_cos", "dmd_vs_student_r2"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_overlapping_spans_are_refused(tmp_path):
    student = Student()
    callback = DMDCallback(spans=[[0, 2], [1, 2]], calib_images=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="overlap"):
        trainer.fit(student)


def test_spans_come_from_the_caller():
    """The callback knows no partition: spans are given, from the config or the caller."""
    with pytest.raises(ValueError, match="no spans given"):
        DMDCallback([])
    assert DMDCallback.from_config({"spans": None}, default_spans=SPANS).spans == SPANS
    assert DMDCallback.from_config({"spans": [[1, 3]]}, default_spans=SPANS).spans == [(1, 3)]


def test_refit_adds_training_batches_to_the_moments(tmp_path):
    student = Student()
    callback = DMDCallback(
        SPANS, solvers=["ridge"], selections=["span"], calib_images=6, refit_every_n_steps=2
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        callbacks=[callback],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(student)
    assert callback.fits == 2  # at fit start, then at step 2
    # calibration: 6 valid images of batches 0-1; then training batches 0 and 1 (4 + 3 valid)
    ref = MomentAccumulator(4, 16, endpoints=[(0, 2), (2, 4)])
    batches = list(student.train_dataloader())
    for batch in batches[:2]:
        keep = batch["valid"] & (torch.cumsum(batch["valid"], 0) <= 6 - ref.images)
        ref.update(student.teacher.trajectory(batch["image"]), keep)
    for batch in batches[:2]:
        ref.update(student.teacher.trajectory(batch["image"]), batch["valid"])
    assert callback.moments.images == ref.images == 13
    assert torch.allclose(callback.moments.buffer, ref.buffer, rtol=1e-10)
