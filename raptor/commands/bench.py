"""`raptor bench train|dmd|data`: parse the action's options, run it, print (and --json).

The actions live in `raptor.bench` (one module each)."""

from __future__ import annotations

import argparse

import torch

from raptor.bench import data, dmd, train
from raptor.bench.common import write_json

# action -> (module with HELP, add_arguments(parser), run(args) -> dict; takes --device)
ACTIONS = {"train": (train, True), "data": (data, False), "dmd": (dmd, True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (module, device) in ACTIONS.items():
        p = sub.add_parser(name, help=module.HELP)
        module.add_arguments(p)
        _add_common(p, device)


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The options every action takes: --device/--matmul-precision (not `data`), --threads, --json."""
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        p.add_argument(
            "--matmul-precision",
            choices=["highest", "high", "medium"],
            help="torch.set_float32_matmul_precision (high/medium let float32 matmuls use TF32)",
        )
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's). On a CPU shared with other jobs use 1: "
        "OpenMP threads waiting on a busy core can make small ops many times slower",
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def main(args: argparse.Namespace) -> int:
    module, _ = ACTIONS[args.action]
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "matmul_precision", None):
        torch.set_float32_matmul_precision(args.matmul_precision)
    result = module.run(args)
    write_json(args.json, result)
    return 0
