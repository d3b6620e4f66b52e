"""`raptor phases CONFIG [k=v ...]` or `raptor phases --matrix FILE --k K`: the phase partition,
printed beside the other method's with both objectives."""

from __future__ import annotations

import argparse
import json
import sys

from raptor.cli import config_from_args
from raptor.eval.phases import (
    KINDS,
    METHODS,
    MIN_SPLIT,
    PHASES_FILE,
    compare_methods,
    describe,
    discover_phases,
    dissimilarity,
    read_matrix,
    total_weight,
)


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
    m.add_argument("--k", type=int, help="number of phases (bisect with --eps: optional)")
    m.add_argument("--method", choices=METHODS, default="dp")
    m.add_argument("--min-length", type=int, default=1, help="minimum layers per phase (default 1)")
    m.add_argument(
        "--min-split",
        type=int,
        default=MIN_SPLIT,
        help=f"bisect never splits a phase of fewer layers (default {MIN_SPLIT}, the reference's)",
    )
    m.add_argument(
        "--eps",
        type=float,
        help="bisect only makes splits gaining more than EPS x the total pair weight",
    )


def main(args: argparse.Namespace) -> int:
    if args.matrix is not None:
        if args.config is not None or (args.k is None and args.eps is None):
            print(
                "raptor phases: --matrix FILE needs --k K (or --eps) and no CONFIG", file=sys.stderr
            )
            return 2
        matrix = read_matrix(args.matrix)
        objectives = compare_methods(
            matrix, args.k, args.method, args.kind, args.min_length, args.min_split, args.eps
        )
        total = total_weight(dissimilarity(matrix, args.kind))
        print(describe(objectives, args.method, total), file=sys.stderr)
        boundaries = objectives[args.method]["boundaries"]
        print(
            json.dumps({"boundaries": boundaries, "objectives": objectives, "total_weight": total})
        )
        return 0
    if args.config is None:
        print("raptor phases: give CONFIG [key=value ...], or --matrix FILE --k K", file=sys.stderr)
        return 2
    from raptor.train.runs import prepare_run_dir

    cfg = config_from_args(args, "phases")
    run_dir = prepare_run_dir(cfg)
    result = discover_phases(cfg, run_dir)
    for k, b in result["partitions"].items():
        if "objectives" in result:
            line = describe(result["objectives"][k], result["method"], result["total_weight"])
        else:  # written before the objectives were recorded
            line = f"{result['method']} {b} (cut {result['cut'][k]:.4f})"
        print(f"k={k}: {line}")
    print(f"phases written to {run_dir / PHASES_FILE}")
    return 0
