"""`raptor shards --source ... --out DIR` writes shards; `raptor shards write CONFIG [k=v ...]`
writes the config's data.source where the pipeline does (runs/NAME/shards, or data.shards_dir);
`raptor shards verify DIR` checks them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from raptor.cli import add_config_arguments, config_from_args
from raptor.data.shards import MANIFEST, ensure_shards, verify_shards, write_shards
from raptor.errors import UserError
from raptor.run_folders import run_folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="write|verify")
    write = actions.add_parser(
        "write",
        help="write the config's data.source where the pipeline does (runs/NAME/shards)",
        description="Write the shards of the config's data.source (digits, imagefolder:PATH, "
        "digit_scenes, ade20k:PATH, nyuv2:PATH) with its data.shard_size, val_fraction, "
        "split_seed, store_crop and scene_* keys into data.shards_dir, "
        "default runs/NAME/shards; a folder holding a manifest.json is kept.",
    )
    add_config_arguments(write)
    verify = actions.add_parser(
        "verify",
        help="check every shard's sha256 and sample count against DIR/manifest.json",
        description="Check every shard's sha256 and sample count against DIR/manifest.json; "
        "exit 0 when all are good, 1 naming each bad shard, 2 without a readable manifest.",
    )
    verify.add_argument("dir", help="shard folder holding manifest.json")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--source",
        help="digits | imagefolder:PATH | digit_scenes | ade20k:PATH (ADEChallengeData2016 "
        "layout) | nyuv2:PATH ({train,val}/{rgb,depth}) (required to write)",
    )
    parser.add_argument(
        "--out", help="output folder (must be empty unless --overwrite; required to write)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="digits, digit_scenes: validation fraction"
    )
    parser.add_argument("--scenes", type=int, default=2000, help="digit_scenes: scenes in all")
    parser.add_argument("--scene-size", type=int, default=8, help="digit_scenes: canvas side")
    parser.add_argument("--scene-digits", type=int, default=2, help="digit_scenes: digits each")
    parser.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        metavar="SIDE",
        help="store resize(shorter side=SIDE, bicubic) + center crop SIDE x SIDE as JPEG q95; "
        "SIDE must be the reader's resize side (data.transform.resize; 256 for the DINOv2 configs)",
    )
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards in a non-empty --out"
    )


def main(args: argparse.Namespace) -> int:
    if args.action == "verify":
        return verify_main(args.dir, progress=False if args.no_progress else None)
    if args.action == "write":
        cfg = config_from_args(args)
        if cfg.data.source == "shards":
            raise UserError("data.source=shards: the config reads shards, it names none to write")
        folder = run_folders(cfg).shards
        ensure_shards(cfg, folder)
        print(f"shards of {cfg.data.source} in {folder}")
        return 0
    if not (args.source and args.out):
        print(
            "raptor shards: --source and --out are required (or `raptor shards verify DIR`)",
            file=sys.stderr,
        )
        return 2
    try:
        manifest = write_shards(
            args.source,
            args.out,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            crop=args.crop,
            overwrite=args.overwrite,
            workers=args.workers,
            scenes={"count": args.scenes, "size": args.scene_size, "digits": args.scene_digits},
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"raptor shards: {exc}", file=sys.stderr)
        return 2
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_samples']} samples in {len(info['shards'])} shards")
    dense = ", ".join(f"{k}.png" for k in manifest.get("dense", {}))
    what = f"dense targets: {dense}" if dense else f"classes: {len(manifest['classes'])}"
    print(f"{what}; manifest: {Path(args.out) / MANIFEST}")
    skipped = manifest["skipped"]
    if skipped["count"]:
        print(f"skipped {skipped['count']} unreadable images:", file=sys.stderr)
        for path in skipped["paths"]:
            print(f"  {path}", file=sys.stderr)
    return 0


def verify_main(folder: str, progress: Optional[bool] = None) -> int:
    """`raptor shards verify DIR`: one line per bad shard, then a summary; the exit status."""
    try:
        results = verify_shards(folder, progress)
    except UserError as exc:
        print(f"raptor shards verify: {exc}", file=sys.stderr)
        return 2
    bad = [(split, name, problem) for split, name, problem in results if problem]
    for split, name, problem in bad:
        print(f"BAD {Path(folder) / name} ({split}): {problem}")
    if bad:
        print(
            f"{len(bad)} of {len(results)} shards are bad; rewrite them (`raptor shards`) or restore them"
        )
        return 1
    print(
        f"all {len(results)} shards match {Path(folder) / MANIFEST} "
        "(sample counts, tar ends, sha256 where listed)"
    )
    return 0
