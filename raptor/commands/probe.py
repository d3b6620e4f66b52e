"""`raptor probe CONFIG [task=cls|seg|depth] [k=v ...]`: probes of the teacher, the pipeline's Raptors
and baselines on frozen features, side by side (`raptor.eval.probe.run`).

The models are probe.models (default: teacher, the Raptors of pipeline.ks, the identity
a_0 and random weights; any Raptor run folder, .ckpt or exported backbone folder may be
listed); the layer probe.layer (default the last); seg / depth read probe.data's dense
shards (on the digits: digit_scenes written once into runs/NAME/scenes). Writes probe.json,
probe.md, probe_curve.png, the heads (dense tasks: example predictions) into
runs/NAME/probe/TASK (run_dir when given) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raptor.cli import add_config_arguments, config_from_args
from raptor.eval.probe.run import PROBE_FILE, probe_table, run_probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "probe")
    out = run_probe(cfg, cfg.run_dir)
    print(probe_table(out))
    print(f"raptor probe: results in {Path(cfg.run_dir) / PROBE_FILE}")
    return 0
