"""Distillation settings that leave no trace in the loss curve, checked on their effect:
the gradient-norm clip (per block in stage 1, over the whole model in stage 2)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import fit_config

from raptor.train import fit as distill

LR, EPS, CLIP = 1e-3, 1e-8, 1e-6  # EPS: AdamW's default


def adam_gradients(before: dict, after: dict) -> dict:
    """The gradient magnitudes AdamW's first step applied, from the parameter change alone.

    Step 1 without weight decay moves each element by -lr g / (|g| + eps) (bias-corrected
    moments: m = g, sqrt(v) = |g|), so |g| = eps |d| / (lr - |d|) with d the change."""
    out = {}
    for name, p0 in before.items():
        d = (after[name].double() - p0.double()).abs()
        out[name] = EPS * d / (LR - d)
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_norm_is_clipped(stage, tmp_path, digits_shards, tiny_teacher):
    teacher = tiny_teacher
    s = f"train.stage{stage}"
    cfg = fit_config(
        teacher,
        digits_shards,
        **{
            "train.stage": stage,
            f"{s}.steps": 1,
            f"{s}.warmup_steps": 1,  # the first step runs at the peak lr
            f"{s}.lr": LR,
            f"{s}.weight_decay": 0.0,
            f"{s}.grad_clip": CLIP,  # far below the gradient's norm: the clip binds
            "train.val_batches": 1,
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stage 2 from random init
        L.seed_everything(int(cfg.train.seed), verbose=False)  # what fit() does before build()
        _, raptor, _ = distill.build(cfg)
        before = {f"raptor.{k}": v.clone() for k, v in raptor.state_dict().items()}
        out = distill.fit(cfg, tmp_path / "run")
    after = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    grads = adam_gradients(before, after)
    norm = lambda prefix: float(  # noqa: E731
        sum(g.square().sum() for k, g in grads.items() if k.startswith(prefix)) ** 0.5
    )
    if stage == 1:  # each block on its own
        assert [norm(f"raptor.blocks.{j}.") for j in range(2)] == pytest.approx(
            [CLIP, CLIP], rel=1e-3
        )
    else:  # all blocks together
        assert norm("raptor.") == pytest.approx(CLIP, rel=1e-3)
        assert norm("raptor.blocks.0.") < CLIP and norm("raptor.blocks.1.") < CLIP
