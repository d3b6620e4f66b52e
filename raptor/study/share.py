"""What the cells of a study have in common, computed once.

Each cell is a pipeline (`raptor.pipeline`) in its own folder, except its shards, teacher
and phases steps: those live in the study's shared folder, one folder per input hash
(`shared/teacher-<hash>`), so every cell whose steps have the same inputs (the same data,
the same teacher settings and seed, the same phase settings) reuses one result, whichever
study or cell made it. A shared step runs under an exclusive lock on `<folder>.lock`
(`fcntl.flock`, which also holds across SLURM tasks on one shared file system): a cell that
finds the step in progress waits, then skips it as complete.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

from raptor.pipeline import INPUTS_FILE, STEP_FILE, Step, plan_steps, run_step

SHARED_STEPS = ("shards", "teacher", "phases")


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder`.lock (made when missing) for the block."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def complete(step: Step) -> bool:
    """Whether `step`'s folder holds a finished run of its current inputs."""
    inputs, done = step.folder / INPUTS_FILE, step.folder / STEP_FILE
    return (
        done.is_file() and inputs.is_file() and json.loads(inputs.read_text())["hash"] == step.hash
    )


def share_steps(
    steps: List[Step], shared: Path
) -> Tuple[Dict[str, Tuple[str, List[str]]], Callable[..., Dict[str, Any]]]:
    """Move the SHARED_STEPS of `steps` (their hashes filled by `plan_steps`) to
    `shared/NAME-HASH`; returns the plan of the moved steps and a `run_step` that runs a
    shared step under its lock, skipping it when another cell finished it meanwhile."""
    for step in steps:
        if step.name in SHARED_STEPS:
            step.folder = shared / f"{step.name}-{step.hash}"
    plan = plan_steps(steps)

    def run(step: Step, action: str, done: Dict[str, Dict[str, Any]], upstream=()):
        if step.name not in SHARED_STEPS:
            return run_step(step, action, done, upstream)
        with folder_lock(step.folder):
            return run_step(step, "skip" if complete(step) else "run", done, upstream)

    return plan, run
