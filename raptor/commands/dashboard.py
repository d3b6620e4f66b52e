"""`raptor dashboard RUN_ROOT [--port N] [--host H]`: TensorBoard, on this machine, over every
run under RUN_ROOT that wrote TensorBoard events (`logging.tensorboard=true`), each named by
its folder under RUN_ROOT (`k3/stage2`). Serves until Ctrl+C (exit 130) or SIGTERM (143)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import List

from raptor.errors import UserError
from raptor.train.runs import require_tensorboard

EVENTS_GLOB = "events.out.tfevents.*"
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # -> exit status


class _Stopped(Exception):
    """Raised in the main thread by SIGINT / SIGTERM; args[0] is the signal."""


def _stop(signum: int, frame) -> None:
    raise _Stopped(signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="RUN_ROOT", help="a pipeline's folder (runs/NAME) or a run")
    parser.add_argument("--port", type=int, default=6006, help="port to serve on (default 6006)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )


def event_runs(root: Path) -> List[str]:
    """The runs TensorBoard shows for `root`: every folder under it holding event files,
    as its path relative to `root` ("." for `root` itself)."""
    folders = {p.parent for p in root.rglob(EVENTS_GLOB) if p.is_file()}
    return sorted(str(f.relative_to(root)) for f in folders)


def main(args: argparse.Namespace) -> int:
    require_tensorboard("raptor dashboard")
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give a pipeline's run folder (runs/NAME)")
    runs = event_runs(root)
    if not runs:
        raise UserError(
            f"no TensorBoard event files under {root}: train with logging.tensorboard=true"
        )
    from tensorboard import program

    # --logdir names each run by its folder under root (k3/stage2); --logdir_spec would
    # append "/." to a run whose events sit directly in the named folder
    board = program.TensorBoard()
    board.configure(logdir=str(root.resolve()), host=args.host, port=args.port, load_fast="false")
    try:
        url = board.launch()
    except program.TensorBoardServerException as exc:
        raise UserError(f"TensorBoard cannot serve on {args.host}:{args.port}: {exc.msg}") from None
    for signum in STOP_SIGNALS:  # also when started from a script that ignores SIGINT
        signal.signal(signum, _stop)
    print(f"TensorBoard on {len(runs)} runs under {root}: {', '.join(runs)}")
    print(f"  {url}   (Ctrl+C to stop)", flush=True)
    try:
        while True:
            signal.pause()
    except _Stopped as stop:
        received = stop.args[0]
    print(f"dashboard stopped ({signal.Signals(received).name})", flush=True)
    return STOP_SIGNALS[received]
