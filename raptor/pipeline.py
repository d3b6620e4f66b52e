"""`raptor pipeline CONFIG`: the whole job, one sub-folder per step, resumable.

    shards/    webdataset shards   (when data.source is digits or imagefolder:PATH)
    teacher/   small teacher       (when teacher.train_from_scratch and no teacher.weights)
    phases/    similarity matrix, phases.json, heat-map
    k{K}/stage1, k{K}/stage2, k{K}/eval, k{K}/export   for every K in pipeline.ks
    summary.md, summary.json, *.png

A step is complete when its folder holds `step.json` (written last, with the step's
result and wall time); a rerun of the same command skips complete steps, and the
training steps resume from their own last checkpoint, so a killed pipeline resumes
by rerunning it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict

from omegaconf import DictConfig, OmegaConf

from raptor.cli import add_config_arguments, config_from_args
from raptor.errors import read_json
from raptor.runs import prepare_run_dir

STEP_FILE = "step.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    summary = run_pipeline(config_from_args(args))
    print(summary["table"])
    print(summary["where"])
    return 0


def run_step(name: str, folder: Path, fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Run `fn()` unless `folder/step.json` says it already finished; returns the
    step record {"step", "wall_s", "result"}."""
    marker = folder / STEP_FILE
    if marker.is_file():
        print(f"[pipeline] {name}: complete, skipped ({folder})")
        return read_json(marker, "pipeline step record")
    print(f"[pipeline] {name}: running in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = fn()
    done = {"step": name, "wall_s": round(time.perf_counter() - start, 1), "result": result}
    marker.write_text(json.dumps(done, indent=2, default=str))
    return done


def _with(cfg: DictConfig, **updates: Any) -> DictConfig:
    """A copy of cfg with dotted-key updates (`_with(cfg, **{"train.stage": 2})`)."""
    new = copy.deepcopy(cfg)
    for key, value in updates.items():
        OmegaConf.update(new, key, value, merge=False)
    return new


def run_pipeline(cfg: DictConfig) -> Dict[str, Any]:
    """Every step of the module docstring in order; returns `write_summary`'s result."""
    root = prepare_run_dir(cfg)
    steps: Dict[str, Dict[str, Any]] = {}

    if cfg.data.source != "shards":
        from raptor.shards import ensure_shards

        folder = Path(cfg.data.shards_dir or root / "shards")
        steps["shards"] = run_step(
            "shards", folder, lambda: {"shards_dir": ensure_shards(cfg, folder).data.shards_dir}
        )
        cfg = _with(cfg, **{"data.shards_dir": str(folder), "data.source": "shards"})

    if cfg.teacher.train_from_scratch and not cfg.teacher.weights:
        from raptor.teacher_train import train_teacher

        folder = root / "teacher"
        steps["teacher"] = run_step(
            "teacher", folder, lambda: train_teacher(_with(cfg, run_dir=str(folder)), folder)
        )
        cfg = _with(cfg, **{"teacher.weights": steps["teacher"]["result"]["weights"]})

    if cfg.phases.boundaries is None and not cfg.phases.file:
        from raptor.phases import discover_phases

        folder = root / "phases"
        steps["phases"] = run_step(
            "phases", folder, lambda: discover_phases(_with(cfg, run_dir=str(folder)), folder)
        )
        cfg = _with(cfg, **{"phases.file": str(folder / "phases.json")})

    for k in cfg.pipeline.ks:
        steps.update(raptor_steps(_with(cfg, **{"model.k": k}), root / f"k{k}"))

    from raptor.summary import write_summary

    return write_summary(cfg, root, steps)


def raptor_steps(cfg: DictConfig, base: Path) -> Dict[str, Dict[str, Any]]:
    """Stage 1, stage 2, evaluation and export of the Raptor with k = cfg.model.k, in
    `base/{stage1,stage2,eval,export}`; returns their step records."""
    from raptor.distill import fit
    from raptor.evaluate import evaluate
    from raptor.export import export_backbone

    k, steps = cfg.model.k, {}
    s1, s2 = base / "stage1", base / "stage2"
    cfg1 = _with(cfg, run_dir=str(s1), **{"train.stage": 1})
    cfg2 = _with(cfg, run_dir=str(s2), **{"train.stage": 2, "train.init_from": str(s1)})
    steps[f"k{k}/stage1"] = run_step(f"k={k} stage 1", s1, lambda: fit(cfg1, s1))
    steps[f"k{k}/stage2"] = run_step(f"k={k} stage 2", s2, lambda: fit(cfg2, s2))
    if cfg.pipeline.evaluate:
        folder = base / "eval"
        ckpt = steps[f"k{k}/stage2"]["result"]["checkpoint"]
        steps[f"k{k}/eval"] = run_step(
            f"k={k} evaluation",
            folder,
            lambda: evaluate(_with(cfg2, run_dir=str(folder)), ckpt, folder),
        )
    if cfg.pipeline.export:
        out = base / "export"
        steps[f"k{k}/export"] = run_step(
            f"k={k} export",
            out,
            lambda: {
                "dir": str(
                    export_backbone(
                        s2,
                        out / "backbone",
                        onnx=cfg.export.onnx,
                        overwrite=True,
                        opset=cfg.export.onnx_opset,
                    )
                )
            },
        )
    return steps
