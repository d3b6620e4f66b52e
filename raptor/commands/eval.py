"""`raptor eval RUN_OR_CKPT [k=v ...]`: the pipeline's evaluation step for one stage-2 run.

The student rolled out from a_0, the identity map and the DMD baselines on the same
validation batches, per-layer fidelity and top-1 (`raptor.eval.fidelity.evaluate`, as
`raptor pipeline` calls it), with the config stored in the run's checkpoint; `key=value`
overrides change it. Writes eval.json and fidelity.png into the pipeline's eval folder of
that run (`k{K}/eval` beside `k{K}/stage2`; `RUN/eval` for a folder named otherwise), or
into run_dir when given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raptor.cli import apply_threads
from raptor.config import load_config
from raptor.errors import UserError
from raptor.eval.fidelity import EVAL_FILE, evaluate
from raptor.run_folders import absolute_paths, beside_stage2
from raptor.train.checkpoints import checkpoint_file, read_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="RUN_OR_CKPT",
        help="a stage-2 `raptor fit` run folder (its checkpoints/last.ckpt) or a .ckpt file",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the run's config, e.g. dmd.enabled=false",
    )


def main(args: argparse.Namespace) -> int:
    path = checkpoint_file(args.source).absolute()
    hp = read_checkpoint(path)["hyper_parameters"]
    if int(hp.get("stage", 0)) != 2:
        raise UserError(
            f"{args.source} is a stage-{hp.get('stage')} run; the evaluation step takes the "
            "stage-2 run that continues it (`raptor fit CONFIG stage=2`)"
        )
    cfg = absolute_paths(load_config(None, args.overrides, stored=hp["config"]))
    apply_threads(cfg)
    if not any(o.startswith("run_dir=") for o in args.overrides):
        cfg.run_dir = str(beside_stage2(path, "eval"))
    out = evaluate(cfg, path, cfg.run_dir)
    top1 = out["top1"]
    line = f"teacher {top1['teacher']:.4f}, student {top1['student']:.4f}" if top1 else "no head"
    print(f"raptor eval: {out['images']} images; top-1 {line}")
    print(f"raptor eval: results in {Path(cfg.run_dir) / EVAL_FILE}")
    return 0
