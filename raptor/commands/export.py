"""`raptor export RUN_OR_CKPT [--out DIR] [--onnx] [--overwrite]`: write a distilled backbone
as a model repository (config.json, model.safetensors, README.md model card; by default where
the pipeline does: `k{K}/export/backbone` beside a `k{K}/stage2` run), printing each step
(loading, writing, verifying, ONNX export and check) with its time."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict

from raptor.errors import UserError
from raptor.model.backbone import BackboneFormatError
from raptor.run_folders import beside_stage2
from raptor.train.export import export_backbone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="RUN_OR_CKPT",
        help="a `raptor fit` run folder (its checkpoints/last.ckpt) or a .ckpt file; stage-1 "
        "runs of single blocks joined by commas",
    )
    parser.add_argument(
        "--out",
        help="output folder (config.json, model.safetensors, README.md); default: the pipeline's, "
        "k{K}/export/backbone beside a k{K}/stage2 run (RUN/export/backbone otherwise)",
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also write model.onnx, checked in onnxruntime"
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the export files in a non-empty --out"
    )
    parser.add_argument(
        "--teacher-weights",
        metavar="PATH",
        help="the teacher's weights file, when the run's teacher.weights has moved",
    )


def main(args: argparse.Namespace) -> int:
    report: Dict[str, Any] = {}
    if args.out is None and "," in args.source:
        raise UserError("export of several stage-1 runs: name the output folder with --out DIR")
    try:
        out = export_backbone(
            args.source,
            args.out or beside_stage2(args.source, "export") / "backbone",
            onnx=args.onnx,
            overwrite=args.overwrite,
            opset=args.opset,
            teacher_weights=args.teacher_weights,
            report=report,
            progress=lambda line: print(line, flush=True),
        )
    except BackboneFormatError as exc:
        print(f"raptor export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.source} -> {out}: {', '.join(report['files'])}")
    print(f"  read back vs the in-training model: relative error {report['torch_rel_error']:.2e}")
    if "onnx_rel_error" in report:
        print(f"  onnxruntime vs torch: relative error {report['onnx_rel_error']:.2e}")
    print(f"  load: raptor.RaptorBackbone.from_pretrained('{out}')")
    return 0
