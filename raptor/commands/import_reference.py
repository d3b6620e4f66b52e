"""`raptor import-reference CKPT... --config CONFIG [k=v ...] --out RUN`: checkpoints of the
Raptor reference code (KempnerInstitute/raptor) as a `raptor fit` run, read without
unpickling anything but their modules' state (`raptor.train.reference`)."""

from __future__ import annotations

import argparse

from raptor.cli import config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="the reference's torch.save files: one stage-2 Raptor, or the stage-1 Block of "
        "every phase (their names' _start_S_end_E_ give the phases, else phases.boundaries)",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        required=True,
        metavar=("CONFIG", "KEY=VALUE"),
        help="the config of the run it becomes (teacher, data, model options), with overrides",
    )
    parser.add_argument("--out", required=True, metavar="RUN", help="the run folder to write")


def main(args: argparse.Namespace) -> int:
    from raptor.train.reference import import_reference

    config, *overrides = args.config
    cfg = config_from_args(argparse.Namespace(config=config, overrides=overrides))
    out = import_reference(cfg, args.checkpoints, args.out)
    print(
        f"imported {len(out['raptor'].blocks)} reference block(s), phases ending at "
        f"{out['boundaries']}, as a stage-{out['stage']} run: {out['checkpoint']}"
    )
    run = args.out
    nxt = f"raptor fit {config} stage=2 train.init_from={run}"
    if out["stage"] == 2:
        nxt = f"raptor eval {run}; {nxt}"
    print(f"  next: {nxt}; raptor export {run} --out DIR")
    return 0
