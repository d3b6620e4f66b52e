"""The `raptor` command line.

Each sub-command lives in the module named in COMMANDS (`raptor.commands.*`), which provides
`add_arguments(parser)` and `main(args) -> int | None`. Only the chosen
command's module is imported, so `raptor config show` starts without torch.
Commands that take a config accept `CONFIG [key=value ...]`; `stage=N` is
shorthand for `train.stage=N`, `task=T` for `probe.task=T`.

Expected failures (`raptor.errors`) print one message and exit 2 (`UserError`: bad
input) or 1 (`RunFailed`); so do a full disk, a permission or read-only error, a
missing file, and a JSON file that does not parse (exit 2). The traceback is shown
with `raptor --debug COMMAND ...` or `RAPTOR_DEBUG=1`; any other exception keeps it.
DDP workers re-run this same command line, so every rank reports the same way.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import traceback
from typing import List, Optional, Tuple

# name -> (module, one-line help)
COMMANDS = {
    "config": (
        "raptor.commands.config",
        "show the resolved config (`raptor config show CONFIG [k=v ...]`)",
    ),
    "shards": ("raptor.commands.shards", "write webdataset shards from digits or an image folder"),
    "teacher": (
        "raptor.commands.teacher",
        "train a small ViT teacher from scratch on labelled shards",
    ),
    "phases": ("raptor.commands.phases", "layer similarity of the teacher and its phase partition"),
    "fit": ("raptor.commands.fit", "Raptor distillation, stage 1 or 2 (`stage=1|2`)"),
    "dmd": (
        "raptor.commands.dmd",
        "fit and evaluate DMD operators along the teacher's depth",
    ),
    "eval": (
        "raptor.commands.eval",
        "evaluate a stage-2 run as the pipeline does (student, identity, DMD; top-1)",
    ),
    "probe": (
        "raptor.commands.probe",
        "linear probes of the teacher, Raptors and baselines on frozen features (`task=cls`)",
    ),
    "analyze": (
        "raptor.commands.analyze",
        "dynamics of the teacher and its Raptors: convergence, speed, ranks, DMD",
    ),
    "pipeline": (
        "raptor.commands.pipeline",
        "the whole job: shards, teacher, phases, stages 1-2, DMD, export",
    ),
    "export": (
        "raptor.commands.export",
        "export a distilled backbone (config.json + model.safetensors)",
    ),
    "dashboard": ("raptor.commands.dashboard", "TensorBoard on a pipeline's runs, on localhost"),
    "import-reference": (
        "raptor.commands.import_reference",
        "a run from the Raptor reference code's saved blocks (read without running pickled code)",
    ),
    "sync": (
        "raptor.commands.sync",
        "upload a pipeline's offline W&B runs (`wandb sync`), saying what went up",
    ),
    "bench": ("raptor.commands.bench", "throughput and memory benchmarks (train, dmd, data)"),
    "study": (
        "raptor.commands.study",
        "many pipelines as one experiment, locally or as a SLURM array (docs/STUDIES.md)",
    ),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG [key=value ...] for commands driven by a config."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.devices=8")


def config_from_args(args: argparse.Namespace, command: Optional[str] = None):
    """Load CONFIG with its overrides (`stage=N` -> `train.stage=N`); with `command`, its
    run folder and inputs resolved in the pipeline's layout (`raptor.run_folders`)."""
    from raptor.config import load_config

    short = {"stage=": "train.", "task=": "probe."}
    overrides = [
        next((s + o for p, s in short.items() if o.startswith(p)), o) for o in args.overrides
    ]
    cfg = load_config(args.config, overrides)
    if command is not None:
        from raptor.run_folders import command_config  # imports torch: not for `config show`

        cfg = command_config(cfg, command, args.config)
    apply_threads(cfg)
    return cfg


def apply_threads(cfg) -> None:
    """trainer.num_threads, process-wide (DDP workers re-run the CLI and set it too)."""
    if cfg.trainer.num_threads:
        import torch

        torch.set_num_threads(int(cfg.trainer.num_threads))


def build_parser(command: Optional[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raptor",
        description="Distil ViTs into block-recurrent Raptors and fit DMD baselines along depth.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an expected failure (also RAPTOR_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


# errno -> what to do, for the OSErrors a user can fix
_OS_ADVICE = {
    errno.ENOSPC: "free space on that disk or point run_dir (or --out) at another one",
    errno.EDQUOT: "free space within your quota or point run_dir (or --out) at another disk",
    errno.EACCES: "fix its permissions or choose a path you can write (e.g. run_dir=...)",
    errno.EPERM: "fix its permissions or choose a path you can write (e.g. run_dir=...)",
    errno.EROFS: "choose a path on a writable file system (e.g. run_dir=...)",
    errno.ENOENT: "check the path in the config or on the command line",
    errno.ENOTDIR: "a file is in the way of a folder: move it or choose another path",
    errno.EEXIST: "something is in the way (a file where a folder goes?): move it or choose another path",
    errno.EISDIR: "a folder is where a file was expected: choose another path",
}

# the same, for these OSErrors raised with a message and no errno
_OS_CLASS_ERRNO = {
    FileNotFoundError: errno.ENOENT,
    PermissionError: errno.EACCES,
    FileExistsError: errno.EEXIST,
    NotADirectoryError: errno.ENOTDIR,
    IsADirectoryError: errno.EISDIR,
}


def _own_message(exc: BaseException) -> str:
    """The exception's message; for one re-raised from a DataLoader worker, whose message
    torch prefixes with "Caught ... Original Traceback ...", the worker's own message."""
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return text
    marker = f"{type(exc).__name__}: "
    return text[text.rindex(marker) + len(marker) :].strip() if marker in text else text


def describe_failure(exc: BaseException) -> Optional[Tuple[int, str]]:
    """(exit status, one-line message) for an expected failure; None for a bug."""
    from raptor.errors import RunFailed, UserError

    if isinstance(exc, UserError):
        return 2, _own_message(exc)
    if isinstance(exc, RunFailed):
        return 1, _own_message(exc)
    if isinstance(exc, json.JSONDecodeError):
        return 2, f"a JSON file is not valid JSON ({exc}); rerun with --debug to see which"
    if isinstance(exc, OSError) and exc.errno in _OS_ADVICE:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        what = os.strerror(exc.errno)
        where = f"{' -> '.join(paths)}: {what}" if paths else what
        return 2, f"{where} [{errno.errorcode[exc.errno]}]; {_OS_ADVICE[exc.errno]}"
    if exc.__class__ in _OS_CLASS_ERRNO and exc.errno is None:  # raised with a message only
        return 2, f"{exc}; {_OS_ADVICE[_OS_CLASS_ERRNO[exc.__class__]]}"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if command is None:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    debug = args.debug or os.environ.get("RAPTOR_DEBUG", "") not in ("", "0")
    if debug:  # processes this one starts (DDP workers, pipeline steps) show tracebacks too
        os.environ["RAPTOR_DEBUG"] = "1"
    name = " ".join(["raptor", command] + ([args.action] if getattr(args, "action", None) else []))
    try:
        rc = importlib.import_module(COMMANDS[command][0]).main(args)
    except Exception as exc:
        failure = describe_failure(exc)
        if failure is None:
            raise
        if debug:
            traceback.print_exc()
        status, message = failure
        print(f"{name}: {message}", file=sys.stderr)
        return status
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
