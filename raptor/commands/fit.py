"""`raptor fit CONFIG [stage=1|2] [k=v ...]`: Raptor distillation, one stage."""

from __future__ import annotations

import argparse
import sys

from raptor import distributed
from raptor.cli import add_config_arguments, config_from_args
from raptor.train.fit import NonFiniteLossError, fit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "fit")
    try:
        out = fit(cfg)
    except NonFiniteLossError as exc:
        print(f"raptor fit: {exc}", file=sys.stderr)
        return 1
    if distributed.is_rank_zero():
        m = out["metrics"]
        last = max((int(k.rsplit("L", 1)[1]) for k in m if k.startswith("val/r2/L")), default=None)
        r2 = f", val R^2 at layer {last}: {m[f'val/r2/L{last}']:.4f}" if last else ""
        if m.get("val/complete") == 0:
            r2 += " (validation INCOMPLETE: samples missing, see the warnings)"
        print(
            f"stage {out['stage']} done at step {out['step']}{r2}; checkpoint {out['checkpoint']}"
        )
    return 0
