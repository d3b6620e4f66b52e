"""`raptor eval RUN_OR_CKPT [k=v ...]`: the pipeline's evaluation step for one Raptor.

The Raptor is a stage-2 run, a stage-1 run that trained all k blocks, or stage-1 runs of
separate blocks joined by commas (stage 1 without stage 2, an ablation of the Raptor
paper's Table 2: the stage-1 blocks rolled out as one model). The student rolled out
from a_0, the identity map and the DMD baselines on the same validation batches,
per-layer fidelity and top-1 (`raptor.eval.fidelity.evaluate`, as `raptor pipeline`
calls it), with the config stored in the (first) checkpoint and the losses of stage 2
(those of a whole rollout); `key=value` overrides change it. Writes eval.json and
fidelity.png into the pipeline's eval folder of that run (`k{K}/eval` beside
`k{K}/stage2`; `RUN/eval` for a folder named otherwise, the first one when joined), or
into run_dir when given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raptor.cli import apply_threads
from raptor.config import load_config
from raptor.eval.fidelity import EVAL_FILE, evaluate
from raptor.run_folders import absolute_paths, beside_stage2
from raptor.train.checkpoints import load_raptor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="RUN_OR_CKPT",
        help="a `raptor fit` run folder (its checkpoints/last.ckpt) or a .ckpt file: stage 2, "
        "or stage 1 with every block trained; stage-1 runs of separate blocks joined by commas",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the run's config, e.g. dmd.enabled=false",
    )


def main(args: argparse.Namespace) -> int:
    _, ckpts, paths = load_raptor(args.source)  # refuses a source missing blocks
    paths = [p.absolute() for p in paths]
    stored = ckpts[0]["hyper_parameters"]["config"]
    cfg = absolute_paths(load_config(None, ["train.stage=2", *args.overrides], stored=stored))
    apply_threads(cfg)
    if not any(o.startswith("run_dir=") for o in args.overrides):
        cfg.run_dir = str(beside_stage2(paths[0], "eval"))
    out = evaluate(cfg, ",".join(map(str, paths)), cfg.run_dir)
    top1 = out["top1"]
    line = f"teacher {top1['teacher']:.4f}, student {top1['student']:.4f}" if top1 else "no head"
    print(f"raptor eval: stage-{out['stage']} Raptor, {out['images']} images; top-1 {line}")
    print(f"raptor eval: results in {Path(cfg.run_dir) / EVAL_FILE}")
    return 0
