"""The `raptor` command line.

Each sub-command lives in the module named in COMMANDS, which provides
`add_arguments(parser)` and `main(args) -> int | None`. Only the chosen
command's module is imported, so `raptor config show` starts without torch.
Commands that take a config accept `CONFIG [key=value ...]`; `stage=N` is
shorthand for `train.stage=N`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, one-line help)
COMMANDS = {
    "config": (
        "raptor.config_cli",
        "show the resolved config (`raptor config show CONFIG [k=v ...]`)",
    ),
    "shards": ("raptor.shards", "write webdataset shards from digits or an image folder"),
    "teacher": (
        "raptor.teacher_train",
        "train a small ViT teacher from scratch on labelled shards",
    ),
    "phases": ("raptor.phases", "layer similarity of the teacher and its phase partition"),
    "fit": ("raptor.distill", "Raptor distillation, stage 1 or 2 (`stage=1|2`)"),
    "dmd": ("raptor.dmd_run", "fit and evaluate DMD operators along the teacher's depth"),
    "pipeline": (
        "raptor.pipeline",
        "the whole job: shards, teacher, phases, stages 1-2, DMD, export",
    ),
    "export": ("raptor.export", "export a distilled backbone (config.json + model.safetensors)"),
    "bench": ("raptor.bench", "throughput and memory benchmarks (train, dmd, data)"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG [key=value ...] for commands driven by a config."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.devices=8")


def config_from_args(args: argparse.Namespace):
    """Load CONFIG with its overrides (`stage=N` -> `train.stage=N`)."""
    from raptor.config import load_config

    overrides = [("train." + o) if o.startswith("stage=") else o for o in args.overrides]
    cfg = load_config(args.config, overrides)
    if cfg.trainer.num_threads:  # process-wide: DDP workers re-run the CLI and set it too
        import torch

        torch.set_num_threads(int(cfg.trainer.num_threads))
    return cfg


def build_parser(command: Optional[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raptor",
        description="Distil ViTs into block-recurrent Raptors and fit DMD baselines along depth.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from raptor.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if command is None:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        rc = importlib.import_module(COMMANDS[command][0]).main(args)
    except ConfigError as exc:
        print(f"raptor {command}: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
