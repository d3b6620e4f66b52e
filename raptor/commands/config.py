"""`raptor config show CONFIG [key=value ...]`: print the resolved config."""

from __future__ import annotations

import argparse

from raptor.cli import add_config_arguments, config_from_args
from raptor.config import to_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_config_arguments(sub.add_parser("show", help="print the resolved config as YAML"))


def main(args: argparse.Namespace) -> int:
    print(to_yaml(config_from_args(args)), end="")
    return 0
