"""`raptor dmd CONFIG [k=v ...] [--overwrite]`: DMD operators along the teacher's depth."""

from __future__ import annotations

import argparse
from pathlib import Path

from raptor import distributed
from raptor.cli import add_config_arguments, config_from_args
from raptor.eval.dmd_baselines import BUDGET_METRIC, REPORT_FILE, run_dmd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace an existing {REPORT_FILE}"
    )


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "dmd")
    # under torchrun (RANK, WORLD_SIZE, MASTER_ADDR set) the ranks share the calibration images
    distributed.join_process_group(cfg.trainer.accelerator)
    report = run_dmd(cfg, overwrite=args.overwrite)
    if report:
        print(
            f"raptor dmd: {report['calib_images']} calibration / {report['eval_images']} evaluation images"
        )
        for name, v in report["variants"].items():
            last = v["layers"][-1]
            idx = v["layers"].index(last)
            top = f"  top1 {v['top1'][0]:.4f}" if v["top1"] else ""
            print(
                f"  {name:24s} layer {last:3d}: cos {v['fidelity']['cos/all'][idx]:.4f}"
                f"  r2 {v['fidelity']['r2/all'][idx]:.4f}{top}"
            )
        if report["budget_fit"]:
            print(
                f"  calibration budget: {BUDGET_METRIC}(B) = C / B^gamma, gamma = {report['budget_fit']['gamma']:.3f}"
            )
        print(f"raptor dmd: report in {Path(cfg.run_dir) / REPORT_FILE}")
    return 0
