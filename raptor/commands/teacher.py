"""`raptor teacher CONFIG [k=v ...] [--retrain]`: train a small ViT teacher from scratch."""

from __future__ import annotations

import argparse

from raptor.cli import add_config_arguments, config_from_args
from raptor.train.teacher import train_teacher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train again even if the run folder holds a finished teacher (replaces it)",
    )


def main(args: argparse.Namespace) -> int:
    train_teacher(config_from_args(args, "teacher"), retrain=args.retrain)
    return 0
