"""The lr schedule, its scaling rule and the teacher-forcing weight, against closed forms."""

from __future__ import annotations

import math

import pytest
from conftest import make_vit

from raptor.config import load_config
from raptor.model.partition import Partition
from raptor.model.raptor import Raptor
from raptor.model.teacher import Teacher
from raptor.train.fit import Distiller
from raptor.train.schedules import anneal_steps, lr_at, peak_lr, schedule, stage_config, tf_ratio


def test_tf_ratio_and_lr_schedule():
    assert [tf_ratio(s, 8) for s in (0, 2, 4, 8, 12)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert tf_ratio(0, 0) == 0.0
    peak, floor = 1e-3, 1e-6
    assert lr_at(0, peak, floor, 4, 20) == pytest.approx(peak / 4)
    assert lr_at(3, peak, floor, 4, 20) == pytest.approx(peak)
    assert lr_at(4, peak, floor, 4, 20) == pytest.approx(peak)
    assert lr_at(12, peak, floor, 4, 20) == pytest.approx(floor + (peak - floor) * 0.5)
    assert lr_at(20, peak, floor, 4, 20) == pytest.approx(floor)
    mid = lr_at(8, peak, floor, 4, 20)
    assert mid == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)))

    class Stage:
        lr, lr_reference_batch, scale_lr = 3e-4, 256, True

    assert peak_lr(Stage, 1024) == pytest.approx(1.2e-3)
    Stage.scale_lr = False
    assert peak_lr(Stage, 1024) == pytest.approx(3e-4)


def test_schedule_resolves_the_stage_and_scales_with_the_global_batch():
    cfg = load_config(
        None,
        [
            "train.stage=2",
            "train.stage2.steps=40",
            "train.stage2.lr=1e-3",
            "train.stage2.scale_lr=true",
            "train.stage2.lr_reference_batch=64",
        ],
    )
    assert stage_config(cfg).steps == 40
    assert anneal_steps(cfg.train.stage2) == 10  # a quarter of the run by default
    got = schedule(cfg, 96)
    assert got["peak lr"] == pytest.approx(1e-3 * 96 / 64)
    assert got["train.stage2.steps"] == 40 and got["train.stage2.anneal_steps"] == 10
    assert schedule(cfg, 32)["peak lr"] == pytest.approx(1e-3 * 32 / 64)


def test_the_distiller_scales_the_lr_by_the_global_batch_it_is_given():
    """Not by re-reading data.batch_size: the global batch comes from the caller's data."""
    cfg = load_config(
        None,
        [
            "model.k=2",
            "data.batch_size=16",
            "train.stage1.lr=1e-3",
            "train.stage1.scale_lr=true",
            "train.stage1.lr_reference_batch=64",
        ],
    )
    vit = make_vit(img_size=16, patch_size=8, embed_dim=16, depth=4, num_heads=2)
    teacher = Teacher(vit)
    raptor = Raptor.from_config(cfg.model, teacher, Partition(4, [2]))
    module = Distiller(cfg, teacher, raptor, global_batch=48)
    opt = module.configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 48 / 64)
    with pytest.raises(ValueError, match="global_batch"):
        Distiller(cfg, teacher, raptor).configure_optimizers()
