"""`raptor analyze CONFIG [model=teacher|RUN|EXPORT ...] [k=v ...]`: dynamical
interpretability of the teacher and Raptors side by side (`raptor.eval.dynamics`).

Each `model=` names "teacher", a `raptor fit` run folder or checkpoint (stage-1 runs of
separate blocks joined by commas), or an exported backbone folder; without any (and with
analyze.models empty) the teacher and the pipeline's Raptors of pipeline.ks found under
runs/NAME. The teacher is always analysed, first. Writes analysis.json, CSV tables,
analysis.md and the plots into runs/NAME/analysis (or run_dir).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raptor.cli import config_from_args
from raptor.errors import UserError
from raptor.train.runs import CKPT_DIR, LAST_CKPT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="model=teacher|RUN|EXPORT (repeatable) and key=value overrides, e.g. analyze.images=64",
    )


def default_models(cfg) -> list:
    """The teacher and each of the pipeline's Raptors that has a last checkpoint."""
    from raptor.run_folders import final_runs

    found = []
    for k, run in final_runs(cfg).items():
        if (run / CKPT_DIR / LAST_CKPT).is_file():
            found.append(str(run))
        else:
            print(f"raptor analyze: no Raptor k={k} in {run} (not trained yet), left out")
    return ["teacher", *found]


def absolute(source: str) -> str:
    """A model source with every comma-joined path absolute."""
    return ",".join(str(Path(p.strip()).expanduser().absolute()) for p in source.split(","))


def main(args: argparse.Namespace) -> int:
    models = [o.split("=", 1)[1] for o in args.overrides if o.startswith("model=")]
    if any(not m for m in models):
        raise UserError("model= needs a value: teacher, a run folder, a checkpoint or an export")
    args.overrides = [o for o in args.overrides if not o.startswith("model=")]
    cfg = config_from_args(args, "analyze")
    models = models or list(cfg.analyze.models) or default_models(cfg)
    models = [m if m == "teacher" else absolute(m) for m in models]
    from raptor.eval.dynamics.run import run_analysis

    out = Path(cfg.run_dir)
    result = run_analysis(cfg, models, out)
    names = ", ".join(m["name"] for m in result["models"])
    print(f"raptor analyze: {names} on {result['images']} images")
    for line in result["summary"]:
        print("  " + line[2:])
    print(f"raptor analyze: results in {out / 'analysis.md'}")
    return 0
