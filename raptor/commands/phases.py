"""`raptor phases CONFIG [k=v ...]` or `raptor phases --matrix FILE --k K`: the phase partition."""

from __future__ import annotations

import argparse
import json
import sys

from raptor.cli import config_from_args
from raptor.eval.phases import KINDS, METHODS, PHASES_FILE, discover_phases, partition, read_matrix


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`raptor phases CONFIG [k=v ...]` or `raptor phases --matrix FILE --k K ...`."""
    parser.add_argument("config", nargs="?", help="YAML config file (omit with --matrix)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. phases.ks=[2,3]")
    m = parser.add_argument_group("partition a given matrix (no config, no teacher)")
    m.add_argument(
        "--matrix", metavar="FILE", help="L x L matrix: .npy or whitespace-separated text"
    )
    m.add_argument(
        "--kind",
        choices=KINDS,
        default="similarity",
        help="similarity (W = 1 - S) or distance (W = M)",
    )
    m.add_argument("--k", type=int, help="number of phases")
    m.add_argument("--method", choices=METHODS, default="dp")
    m.add_argument("--min-length", type=int, default=1, help="minimum layers per phase (default 1)")


def main(args: argparse.Namespace) -> int:
    if args.matrix is not None:
        if args.config is not None or args.k is None:
            print("raptor phases: --matrix FILE needs --k K and no CONFIG", file=sys.stderr)
            return 2
        try:
            boundaries = partition(
                read_matrix(args.matrix), args.k, args.method, args.kind, args.min_length
            )
        except ValueError as exc:
            print(f"raptor phases: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"boundaries": boundaries}))
        return 0
    if args.config is None:
        print("raptor phases: give CONFIG [key=value ...], or --matrix FILE --k K", file=sys.stderr)
        return 2
    from raptor.train.runs import prepare_run_dir

    cfg = config_from_args(args, "phases")
    run_dir = prepare_run_dir(cfg)
    result = discover_phases(cfg, run_dir)
    for k, b in result["partitions"].items():
        print(f"k={k}: boundaries {b}  (cut {result['cut'][k]:.4f})")
    print(f"phases written to {run_dir / PHASES_FILE}")
    return 0
