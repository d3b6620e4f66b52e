"""`raptor sync RUN_ROOT [--dry-run] [--include-stale]`: upload every offline W&B run of a
pipeline (or of any folder of runs) with `wandb sync`, and say what went up.

Finds the offline run folders (`*/wandb/offline-run-*`) under RUN_ROOT, leaving out those
of step folders moved aside by a rerun (`*.stale-*`) unless `--include-stale`, reads each
one's run files (wandb's `Record` protobufs in the `.wandb` transaction log) and prints,
per run: its name, job type, group, and the artifacts it logs and uses; then runs
`wandb sync` on them all (the `wandb` command on PATH) and reports each as uploaded once
wandb has marked it synced. `--dry-run` lists the same without calling `wandb`.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List

from raptor.errors import RunFailed, UserError

_BLOCK = 32768  # the leveldb log format wandb writes: 32 KiB blocks of framed chunks
_CHUNK = struct.Struct("<IHB")  # crc32, length, kind (1 full, 2 first, 3 middle, 4 last)
_HEADER = struct.Struct("<4sHB")  # b":W&B", magic, version


def read_records(path: str | Path) -> Iterator:
    """The `wandb.proto.wandb_internal_pb2.Record`s of one `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < _HEADER.size or _HEADER.unpack_from(data)[0] != b":W&B":
        raise UserError(f"{path}: not a W&B run file (no ':W&B' header)")
    pos, parts = _HEADER.size, []
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, size, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        parts.append(data[pos + _CHUNK.size : pos + _CHUNK.size + size])
        pos += _CHUNK.size + size
        if kind in (1, 4):  # a record is complete
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


@dataclass
class OfflineRun:
    """What one offline run folder holds, read from its `.wandb` file."""

    folder: Path
    name: str = ""
    job_type: str = ""
    group: str = ""
    logged: List[str] = field(default_factory=list)  # artifacts it produces
    used: List[str] = field(default_factory=list)  # artifacts it declares as inputs

    @classmethod
    def read(cls, folder: Path) -> OfflineRun:
        run = cls(folder)
        for path in sorted(folder.glob("*.wandb")):
            for record in read_records(path):
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    run.name, run.job_type = record.run.display_name, record.run.job_type
                    run.group = record.run.run_group
                elif kind == "artifact" and record.artifact.type != "run_table":
                    art = record.artifact
                    (run.used if art.use_after_commit else run.logged).append(art.name)
        return run

    @property
    def synced(self) -> bool:
        """wandb marks an uploaded run file with a `.synced` file beside it."""
        files = list(self.folder.glob("*.wandb"))
        return bool(files) and all(Path(f"{f}.synced").is_file() for f in files)

    def describe(self) -> str:
        line = f"{self.name or self.folder.name} ({self.job_type or 'no job type'})"
        if self.logged:
            line += f"; logs {', '.join(self.logged)}"
        if self.used:
            line += f"; uses {', '.join(self.used)}"
        return line


def offline_runs(root: Path, include_stale: bool = False) -> List[Path]:
    """The offline W&B run folders under `root`, oldest first per step folder."""
    found = sorted(root.glob("**/wandb/offline-run-*"))
    return [p for p in found if include_stale or not any(".stale-" in s for s in p.parts)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="RUN_ROOT", help="a pipeline's run folder (runs/NAME)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded, upload nothing"
    )
    parser.add_argument(
        "--include-stale",
        action="store_true",
        help="also the runs of step folders a rerun moved aside (*.stale-*)",
    )


def main(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder (expected a pipeline's run_dir)")
    folders = offline_runs(root, args.include_stale)
    if not folders:
        raise UserError(
            f"no offline W&B runs under {root} (runs are written with logging.wandb=offline)"
        )
    runs = [OfflineRun.read(f) for f in folders]
    verb = "would upload" if args.dry_run else "uploading"
    print(f"raptor sync: {verb} {len(runs)} offline run(s) under {root}")
    for run in runs:
        print(f"  {run.folder.relative_to(root)}: {run.describe()}")
    if args.dry_run:
        return 0
    wandb = shutil.which("wandb")
    if wandb is None:
        raise UserError("the `wandb` command is not on PATH (pip install wandb)")
    done = subprocess.run([wandb, "sync", *map(str, folders)], capture_output=True, text=True)
    uploaded = [r for r in runs if r.synced]
    print(f"raptor sync: uploaded {len(uploaded)} of {len(runs)} run(s)")
    for run in uploaded:
        print(f"  uploaded {run.describe()}")
    if done.returncode != 0 or len(uploaded) < len(runs):
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RunFailed(
            f"`wandb sync` exited {done.returncode} with "
            f"{len(runs) - len(uploaded)} run(s) not uploaded: {' | '.join(tail)}"
        )
    return 0
