"""What changes with the training step: the learning rate and the teacher-forcing weight.

Per stage (`train.stage1` / `train.stage2`): linear warmup over `warmup_steps`,
then cosine to `min_lr` at `steps` (`lr_at`). The peak lr is `lr`, or
`lr * global_batch / lr_reference_batch` with `scale_lr` (the linear scaling
rule; `global_batch` is the images per optimizer step over all ranks, which
the caller takes from its data; min_lr is not scaled). Stage 1's teacher-forcing
weight is r = max(0, 1 - step / anneal_steps), `anneal_steps` defaulting to a
quarter of the run, or, as ablations (`teacher_forcing`), r = 1 throughout (`always`)
or r = 0 throughout (`never`).
"""

from __future__ import annotations

import math
from typing import Any, Dict

from raptor.config import TEACHER_FORCING, ConfigError


def lr_at(step: int, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup from peak/warmup to peak over `warmup` steps, then cosine to min_lr at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(stage_cfg: Any, global_batch: int) -> float:
    """`lr`, scaled by global_batch / lr_reference_batch when `scale_lr` (linear rule)."""
    if stage_cfg.scale_lr:
        return float(stage_cfg.lr) * global_batch / int(stage_cfg.lr_reference_batch)
    return float(stage_cfg.lr)


def stage_config(cfg: Any) -> Any:
    """The `train.stage1` or `train.stage2` section of the config's stage."""
    stage = int(cfg.train.stage)
    if stage not in (1, 2):
        raise ConfigError(f"train.stage must be 1 or 2, got {stage}")
    return cfg.train[f"stage{stage}"]


def anneal_steps(stage_cfg: Any) -> int:
    """Teacher-forcing anneal length: `anneal_steps`, default a quarter of the run."""
    if stage_cfg.anneal_steps is not None:
        return int(stage_cfg.anneal_steps)
    return int(stage_cfg.steps) // 4


def tf_ratio(step: int, anneal_steps: int, mode: str = "anneal") -> float:
    """Teacher-forcing weight r at `step`: with `mode` anneal, max(0, 1 - step /
    anneal_steps) (0 when anneal_steps <= 0); `always`: 1; `never`: 0."""
    if mode not in TEACHER_FORCING:
        raise ConfigError(f"teacher_forcing={mode!r}: expected one of {', '.join(TEACHER_FORCING)}")
    if mode != "anneal":
        return 1.0 if mode == "always" else 0.0
    if anneal_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / anneal_steps)


def schedule(cfg: Any, global_batch: int) -> Dict[str, Any]:
    """What the optimizer and schedule of cfg's stage follow, by config key: steps, lr,
    min_lr, warmup_steps, anneal_steps (resolved), weight_decay, teacher_forcing (stage 1),
    and the peak lr they give for `global_batch` images per step. Stored in checkpoints to
    check resumes."""
    stage_cfg, prefix = stage_config(cfg), f"train.stage{cfg.train.stage}."
    keys = ("steps", "lr", "min_lr", "warmup_steps", "weight_decay")
    out = {prefix + k: stage_cfg[k] for k in keys}
    out[prefix + "anneal_steps"] = anneal_steps(stage_cfg)
    if int(cfg.train.stage) == 1:
        out[prefix + "teacher_forcing"] = str(stage_cfg.teacher_forcing)
    out["peak lr"] = peak_lr(stage_cfg, global_batch)
    return out
