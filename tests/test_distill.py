"""Raptor distillation in one process: stage 1 then stage 2 on a tiny teacher and the
digits shards, evaluation against independent computations, checkpoints, errors.

The teacher is a random-weight timm ViT (depth 4, width 32, 2 registers, 10 classes)
whose residual branches are scaled up so that its depth trajectory moves far from a_0
(the identity map a_L ~ a_0 has R^2 < 0 at the last layer).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import STAGE1_STEPS, STAGE2_STEPS, fit_config, fit_overrides, read_csv

from raptor.config import ConfigError, from_container, load_config
from raptor.errors import RunFailed
from raptor.train import fit as distill
from raptor.train.checkpoints import checkpoint_file, first_non_finite, load_blocks, load_raptor
from raptor.train.schedules import lr_at


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits_shards, tiny_teacher):
    root = tmp_path_factory.mktemp("distill")
    return {
        "root": root,
        "teacher": tiny_teacher,
        "shards": digits_shards,
    }


@pytest.fixture(scope="module")
def stage1(setup):
    cfg = fit_config(setup["teacher"], setup["shards"], **{"train.stage": 1})
    return cfg, distill.fit(cfg, setup["root"] / "stage1")


@pytest.fixture(scope="module")
def stage2(setup, stage1):
    cfg = fit_config(
        setup["teacher"],
        setup["shards"],
        **{
            "train.stage": 2,
            "train.init_from": stage1[1]["run_dir"],
            "dmd.enabled": True,
            "dmd.calib_images": 64,
            "dmd.solvers": "[ridge]",
            "dmd.selections": "[span,identity]",
        },
    )
    return cfg, distill.fit(cfg, setup["root"] / "stage2")


def _per_layer(metrics: dict, name: str, layers) -> list[float]:
    return [metrics[f"{name}/L{layer}"] for layer in layers]


def test_stage1_then_stage2_lower_the_loss_and_beat_identity(setup, stage1, stage2):
    from raptor.eval.fidelity import evaluate, run_validation

    cfg1, out1 = stage1
    cfg2, out2 = stage2
    assert out1["step"] == STAGE1_STEPS and out2["step"] == STAGE2_STEPS
    # the untrained student (the same init as stage 1), on the same validation batches
    L.seed_everything(0, verbose=False)
    teacher, fresh, _ = distill.build(cfg1)
    before = run_validation(
        cfg1,
        teacher,
        fresh,
        setup["root"] / "base",
        rollout="phase",
        limit_batches=cfg1.train.val_batches,
    )
    after = _per_layer(out1["metrics"], "val/loss", range(1, 5))
    assert all(a < 0.7 * b for a, b in zip(after, before["loss"])), (before["loss"], after)
    # stage 2 against the stage-1 student, both rolled out from a_0 over all layers
    ev1 = evaluate(cfg2, out1["run_dir"], setup["root"] / "eval1")
    ev2 = evaluate(cfg2, out2["checkpoint"], setup["root"] / "eval2")
    assert ev2["loss"][-1] < ev1["loss"][-1] and sum(ev2["loss"]) < sum(ev1["loss"])
    assert ev2["images"] == 359  # every validation sample once
    r2, ident = ev2["student"]["r2"]["all"], ev2["identity"]["r2"]["all"]
    assert r2[-1] > 0.8 and r2[-1] > ident[-1] + 0.5, (r2, ident)
    # the metrics logged during training use the same names and per-group values
    m = out2["metrics"]
    assert m["val/r2/L4"] > m["val_identity/r2/L4"]
    for key in (
        "val/r2_cls/L4",
        "val/r2_reg/L4",
        "val/r2_patch/L4",
        "val/r2_ref/L4",
        "val/r2_affine/L4",
        "val/r2_affine_cls/L4",
        "val/cos/L4",
        "val/rel_l2/L4",
        "val/top1_teacher",
        "val/top1_student",
    ):
        assert key in m and math.isfinite(m[key]), key
    assert (Path(out2["run_dir"]) / "val_metrics.json").is_file()
    # the DMD callback scored its baselines on the same validation batches
    assert "val_dmd/span_ridge/r2/L4" in m and "val_dmd/identity/r2/L4" in m
    assert (Path(out2["run_dir"]) / "dmd_compare.csv").is_file()
    assert (setup["root"] / "eval2" / "eval.json").is_file()
    # evaluation scores the DMD baselines on its own batches: a span map at every layer,
    # and the first phase's DMD identity (from a_0) is exactly the evaluation's identity
    dmd = ev2["dmd"]
    assert {"span_ridge", "identity"} <= set(dmd)
    assert all(v is not None for v in dmd["span_ridge"]["r2"]["all"])
    assert dmd["identity"]["r2"]["all"][:2] == pytest.approx(ev2["identity"]["r2"]["all"][:2])
    assert (setup["root"] / "eval2" / "fidelity.png").stat().st_size > 1000


def test_evaluation_matches_direct_computation(setup, stage2):
    """eval.json's R^2, top-1 and identity numbers against a plain loop over the val set."""
    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher

    cfg2, out2 = stage2
    ev = json.loads((setup["root"] / "eval2" / "eval.json").read_text())
    teacher = Teacher.from_config(cfg2.teacher)
    raptor, _, _ = load_raptor(out2["checkpoint"])
    dm = ShardDataModule(cfg2.data, teacher.data_config)
    preds, targets, hits_t, hits_s, n = [], [], 0, 0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            keep = batch["valid"]
            traj = teacher.trajectory(batch["image"][keep])
            student = raptor(traj[:, 0])
            preds.append(student[:, -1].double())
            targets.append(traj[:, -1].double())
            labels = batch["label"][keep]
            hits_t += int((teacher.vit(batch["image"][keep]).argmax(-1) == labels).sum())
            hits_s += int((teacher.finish(student[:, -1], 4)["logits"].argmax(-1) == labels).sum())
            n += len(labels)
    p, y = torch.cat(preds).flatten(0, 1), torch.cat(targets).flatten(0, 1)  # (rows, D)
    r2 = 1 - ((p - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    pc, yc = p - p.mean(1, keepdim=True), y - y.mean(1, keepdim=True)  # per token, over features
    r2_affine = ((pc * yc).sum(1).square() / (pc.square().sum(1) * yc.square().sum(1))).mean()
    assert n == 359
    assert ev["student"]["r2"]["all"][-1] == pytest.approx(r2.item(), abs=1e-5)
    assert ev["student"]["r2_affine"]["all"][-1] == pytest.approx(r2_affine.item(), abs=1e-5)
    assert ev["top1"]["teacher"] == pytest.approx(hits_t / n)
    assert ev["top1"]["student"] == pytest.approx(hits_s / n)


def test_schedule_logging_and_checkpoint_contents(stage1):
    cfg, out = stage1
    rows = read_csv(Path(out["run_dir"]) / "metrics.csv")
    anneal = STAGE1_STEPS // 4
    seen = 0
    for row in rows:
        if row.get("train/r"):
            step = int(row["step"])
            assert float(row["train/r"]) == pytest.approx(max(0.0, 1 - step / anneal), abs=1e-6)
            assert math.isfinite(float(row["train/tf_B1"])) == (step < anneal)  # skipped at r = 0
            assert float(row["train/lr"]) == pytest.approx(
                lr_at(step, 3e-3, 1e-6, 2, STAGE1_STEPS), rel=1e-5
            )
            seen += 1
    assert seen == STAGE1_STEPS
    assert any(row.get("val/r2/L4") for row in rows) and any(row.get("train/img_s") for row in rows)
    # plain containers: loads with weights_only=True; no teacher weights; config round-trips
    ckpt = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STAGE1_STEPS
    hp = ckpt["hyper_parameters"]
    assert type(hp) is dict and hp["stage"] == 1 and hp["blocks"] == [1, 2]
    assert from_container(hp["config"]).train.stage1.steps == STAGE1_STEPS
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert {k.split(".")[2] for k in ckpt["state_dict"]} == {"0", "1"}


def test_block_subset_and_joining(setup, stage1, tmp_path):
    cfg = fit_config(
        setup["teacher"],
        setup["shards"],
        **{"train.blocks": "[2]", "train.stage1.steps": 6, "train.val_every_n_steps": 4},
    )
    out = distill.fit(cfg, tmp_path / "b2")
    # validated at step 4 and, after the last step, once more
    assert json.loads((tmp_path / "b2" / "val_metrics.json").read_text())["step"] == 6
    # rerunning a finished run resumes at its end: no training, the same checkpoint
    again = distill.fit(cfg, tmp_path / "b2")
    assert again["step"] == 6 and again["metrics"]["val/r2/L4"] == pytest.approx(
        out["metrics"]["val/r2/L4"]
    )
    L.seed_everything(0, verbose=False)
    _, init, _ = distill.build(cfg)
    ckpt = torch.load(out["checkpoint"], weights_only=True)
    state = {k[len("raptor.") :]: v for k, v in ckpt["state_dict"].items()}
    b1 = [torch.equal(v, state[f"blocks.0.{k}"]) for k, v in init.blocks[0].state_dict().items()]
    b2 = [torch.equal(v, state[f"blocks.1.{k}"]) for k, v in init.blocks[1].state_dict().items()]
    assert all(b1) and not all(b2)  # block 1 frozen, block 2 trained
    assert ckpt["hyper_parameters"]["blocks"] == [2]
    assert "val/r2/L3" in out["metrics"] and "val/r2/L1" not in out["metrics"]
    assert "val/top1_student_B2" in out["metrics"]
    # stage 2 joins blocks from the runs that trained them, each block from exactly one
    _, raptor, _ = distill.build(cfg)
    with pytest.raises(ConfigError, match=r"no stage-1 weights for block\(s\) \[1\]"):
        load_blocks(raptor, out["run_dir"])
    with pytest.raises(ConfigError, match="block 2 is in both"):
        load_blocks(raptor, f"{stage1[1]['run_dir']},{out['run_dir']}")
    assert load_blocks(raptor, stage1[1]["run_dir"]) == [1, 2]
    full = torch.load(stage1[1]["checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, full[f"raptor.{k}"]) for k, v in raptor.state_dict().items())


def test_non_finite_loss_stops_and_keeps_last_checkpoint(setup, stage1, tmp_path, capsys):
    from raptor.cli import main

    run = tmp_path / "nan"
    shutil.copytree(stage1[1]["run_dir"], run)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    cfg_file = tmp_path / "nan.yaml"
    cfg_file.write_text("name: nan\n")
    rc = main(
        [
            "fit",
            str(cfg_file),
            *fit_overrides(setup["teacher"], setup["shards"]),
            f"run_dir={run}",
            "train.stage1.steps=50",
            "train.schedule_change=apply",
            "train.stage1.noise_sigma=inf",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert f"non-finite training loss at step {STAGE1_STEPS}" in err
    assert f"{run / 'checkpoints' / 'last.ckpt'} (step {STAGE1_STEPS})" in err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


class StepData:
    """Mixin for the shard data module (test-only, through its real `on_after_batch_transfer`
    hook): records the step of each training batch, makes the images of step `nan_at` NaN,
    and at step `nan_block1_at` sets a weight of Raptor block 1 to NaN."""

    def __init__(self, *args, nan_at=None, nan_block1_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at, self.nan_block1_at, self.steps = nan_at, nan_block1_at, []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            step = self.trainer.global_step
            self.steps.append(step)
            if step == self.nan_at:
                batch = {**batch, "image": torch.full_like(batch["image"], math.nan)}
            if step == self.nan_block1_at:
                block = self.trainer.lightning_module.raptor.blocks[0]
                next(block.parameters()).data.fill_(math.nan)
        return batch


def step_data(cfg, **kwargs):
    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher

    class Data(StepData, ShardDataModule):
        pass

    teacher = Teacher.from_config(cfg.teacher)
    return Data(cfg.data, teacher.data_config, teacher.num_classes, **kwargs)


def test_non_finite_loss_names_the_checkpoint_that_exists(setup, tmp_path):
    """Checkpoints every 5 steps and a NaN batch at step 10: the checkpoint taken at step 10
    gave that loss, so the good one is step 5's; the run resumes from it."""
    cfg = fit_config(
        setup["teacher"],
        setup["shards"],
        **{
            "train.stage1.steps": 12,
            "train.ckpt_every_n_steps": 5,
            "train.val_every_n_steps": 12,
            "train.val_batches": 1,
        },
    )
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(RunFailed) as err:
        distill.fit(cfg, run, step_data(cfg, nan_at=10))
    assert isinstance(err.value, distill.NonFiniteLossError)
    assert "non-finite training loss at step 10" in str(err.value)
    assert f"{last} (step 5)" in str(err.value)
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 5 and first_non_finite(ckpt) is None
    data = step_data(cfg)
    assert distill.fit(cfg, run, data)["step"] == 12
    assert data.steps == list(range(5, 12))
    logged = [int(r["step"]) for r in read_csv(run / "metrics.csv") if r.get("train/loss")]
    assert logged == list(range(12))
    # a NaN before the first checkpoint: the message says there is none
    early = tmp_path / "early"
    with pytest.raises(RunFailed, match="at step 3 .*No checkpoint of this run exists yet"):
        distill.fit(cfg, early, step_data(cfg, nan_at=3))
    assert not list(early.glob("checkpoints/*"))


def test_non_finite_weights_are_never_checkpointed(setup, tmp_path):
    """Only block 2 trains (its loss starts from the teacher's a_2, so block 1's weights do
    not enter it): a NaN weight in frozen block 1 leaves the loss finite, and the
    checkpoint after the step is refused, naming the weight and the step."""
    cfg = fit_config(
        setup["teacher"],
        setup["shards"],
        **{
            "train.blocks": "[2]",
            "train.stage1.steps": 3,
            "train.ckpt_every_n_steps": 1,
            "train.val_batches": 1,
        },
    )
    data = step_data(cfg, nan_block1_at=0)
    with pytest.raises(RunFailed) as err:
        distill.fit(cfg, tmp_path / "run", data)
    first = next(iter(distill.build(cfg)[1].blocks[0].state_dict()))
    assert f"non-finite weight raptor.blocks.0.{first} at step 1" in str(err.value)
    assert "no checkpoint written" in str(err.value) and "No checkpoint of" in str(err.value)
    assert not list((tmp_path / "run").glob("checkpoints/*"))
    assert data.steps == [0]


def test_resume_with_changed_schedule(setup, tmp_path):
    """Refused by default, naming the keys and leaving config.yaml alone; with
    train.schedule_change=apply the new schedule holds from the resumed step on."""
    run = tmp_path / "run"

    def cfg(**extra):
        return fit_config(
            setup["teacher"],
            setup["shards"],
            **{"train.val_every_n_steps": 4, "train.val_batches": 1, **extra},
        )

    distill.fit(cfg(**{"train.stage1.steps": 4}), run)
    saved = (run / "config.yaml").read_bytes()
    longer = {"train.stage1.steps": 8, "train.stage1.lr": 1e-3}
    with pytest.raises(ConfigError) as err:
        distill.fit(cfg(**longer), run)
    for change in ("stage1.steps: 4 -> 8", "stage1.lr: 0.003 -> 0.001", "anneal_steps: 1 -> 2"):
        assert change in str(err.value)
    assert "train.schedule_change=apply" in str(err.value)
    assert (run / "config.yaml").read_bytes() == saved
    assert distill.fit(cfg(**longer, **{"train.schedule_change": "apply"}), run)["step"] == 8
    assert load_config(run / "config.yaml", []).train.stage1.lr == 1e-3
    lrs = {
        int(r["step"]): float(r["train/lr"]) for r in read_csv(run / "metrics.csv") if r["train/lr"]
    }
    assert sorted(lrs) == list(range(8))
    for step, lr in lrs.items():
        peak, total = (3e-3, 4) if step < 4 else (1e-3, 8)
        assert lr == pytest.approx(lr_at(step, peak, 1e-6, 2, total), rel=1e-6), step


def test_run_folder_errors(setup, stage1, tmp_path):
    run1 = stage1[1]["run_dir"]
    cfg = fit_config(setup["teacher"], setup["shards"], **{"train.resume": "never"})
    with pytest.raises(ConfigError, match="resume=never"):
        distill.fit(cfg, run1)
    cfg = fit_config(setup["teacher"], setup["shards"], **{"train.stage": 2})
    with pytest.raises(ConfigError, match="stage-1 checkpoint but train.stage=2"):
        distill.fit(cfg, run1)
    cfg = fit_config(setup["teacher"], setup["shards"], **{"train.stage": 2, "train.blocks": "[1]"})
    with pytest.raises(ConfigError, match="train.blocks"):
        distill.fit(cfg, tmp_path / "x")
    cfg = fit_config(setup["teacher"], setup["shards"], **{"train.blocks": "[3]"})
    with pytest.raises(ConfigError, match=r"1\.\.2"):
        distill.fit(cfg, tmp_path / "y")
    cfg = fit_config(setup["teacher"], setup["shards"], **{"phases.boundaries": "null"})
    with pytest.raises(ConfigError, match="no phase partition"):
        distill.fit(cfg, tmp_path / "z")
    with pytest.raises(ConfigError, match="checkpoint not found"):
        checkpoint_file(tmp_path / "missing")
