"""`raptor pipeline CONFIG [k=v ...] [--plan]`: the whole job, each step once."""

from __future__ import annotations

import argparse

from raptor.cli import add_config_arguments, config_from_args
from raptor.pipeline import run_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print which steps would run, rerun (and why) or be skipped, and stop",
    )


def main(args: argparse.Namespace) -> int:
    summary = run_pipeline(config_from_args(args), plan_only=args.plan)
    if summary is not None:
        print(summary["table"])
        print(summary["where"])
    return 0
