"""Stopping a training run on a signal: checkpoint on every rank, then exit or requeue.

| signal | sent by | what the run does | exit status |
|---|---|---|---|
| SIGTERM | `kill`, `docker stop`, `scancel`, SLURM preemption | checkpoint, stop | 143 |
| SIGINT | Ctrl+C (a second one interrupts at once, without checkpoint) | checkpoint, stop | 130 |
| SIGUSR1 | SLURM before the time limit (`#SBATCH --signal=USR1@120`) | checkpoint, `scontrol requeue`, stop | 0 (138 outside SLURM or if the requeue failed) |

The signal handler only records the signal: no collective, no I/O (Lightning's SLURM
handler saves and synchronises inside the handler and can deadlock, Lightning #21406; it
is switched off by `raptor.train.runs.make_trainer`). After every training batch, every rank
combines the records with one all-reduce (max of the signal numbers: SIGTERM over SIGUSR1
over SIGINT), so all ranks stop after the same step even when only one of them got the
signal. Then every rank saves `checkpoints/last.ckpt` through `trainer.save_checkpoint`
(the file `train.resume=auto` and `raptor teacher` resume from; saved where Lightning's
periodic checkpoints are, so the resumed run continues exactly), global rank 0 removes
Lightning's leftover `hpc_ckpt_*.ckpt` files older than it, requeues the SLURM job when
asked (`requeue_job`: the array task `<array job>_<task>` in a job array, else the job)
and prints one line saying where the checkpoint is and how to resume. At the next hook
(after Lightning has logged the batch's metrics) every rank raises `Stopped`, a
`SystemExit` carrying the exit status above: `raptor fit` / `raptor teacher` (and a
pipeline around them) end with it, without a traceback.

The handlers are installed when training starts and the previous ones are put back when
it ends or fails (commands also run in-process, in tests and `raptor pipeline`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

import lightning as L

from raptor import distributed

SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
REQUEUE_SIGNAL = signal.SIGUSR1


class Stopped(SystemExit):
    """Training stopped on a signal after every rank checkpointed. `code` is the process
    exit status: 0 when the SLURM job was requeued, else 128 + the signal number."""

    def __init__(
        self, signum: int, step: int, checkpoint: Path, requeued: Optional[str] = None
    ) -> None:
        super().__init__(0 if requeued else 128 + signum)
        self.signal = signal.Signals(signum)
        self.step, self.checkpoint, self.requeued = step, checkpoint, requeued


def slurm_job_id(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The id `scontrol requeue` takes: `<array job>_<task>` in a job array, else the job id;
    None outside SLURM."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def requeue_job(job_id: str) -> bool:
    """`scontrol requeue JOB_ID` with the first `scontrol` on PATH; True when it succeeded."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"raptor: `scontrol requeue {job_id}` failed: {exc}", file=sys.stderr, flush=True)
        return False
    return done.returncode == 0


def remove_stale_hpc(run_dir: Path, checkpoint: Path) -> None:
    """Delete the `hpc_ckpt_*.ckpt` that Lightning's SLURM handler left in `run_dir` and
    that `checkpoint` (the run's last.ckpt) has superseded (older or as old)."""
    if not checkpoint.is_file():
        return
    newest = checkpoint.stat().st_mtime
    for old in Path(run_dir).glob("hpc_ckpt_*.ckpt"):
        if old.stat().st_mtime <= newest:
            old.unlink(missing_ok=True)


class Preemption(L.Callback):
    """Checkpoint-and-stop on SIGTERM / SIGINT / SIGUSR1 (see the module docstring).

    checkpoint: the run's last.ckpt; requeue: called on global rank 0 with the SLURM job
    id after a SIGUSR1, returns whether the job was requeued."""

    def __init__(self, checkpoint: Path, requeue: Callable[[str], bool] = requeue_job) -> None:
        self.checkpoint, self.requeue = Path(checkpoint), requeue
        self.received = 0  # the signal number recorded by the handler (0: none)
        self._stopped: Optional[Stopped] = None
        self._previous: Dict[int, object] = {}
        self._installed = False

    # ------------------------------------------------------------ signal handlers

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl+C: stop now
        self.received = max(self.received, signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Lightning installs its own handlers: these are the ones to put back
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self._stopped = 0, None
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:  # replaces Lightning's SIGTERM handler too
                signal.signal(s, self._handle)
            self._installed = True

    def _restore(self) -> None:
        if self._installed:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._installed = False

    # ------------------------------------------------------------ the stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = distributed.all_max(self.received, pl_module.device)
        if signum and self._stopped is None:
            self._stopped = self._stop(trainer, signum)

    def _stop(self, trainer: L.Trainer, signum: int) -> Stopped:
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        name, step = signal.Signals(signum).name, trainer.global_step
        job = slurm_job_id() if signum == REQUEUE_SIGNAL else None
        requeued = 0
        if trainer.is_global_zero:
            remove_stale_hpc(Path(trainer.default_root_dir), self.checkpoint)
            requeued = int(job is not None and self.requeue(job))
        requeued = distributed.all_max(requeued, trainer.lightning_module.device)
        if trainer.is_global_zero:
            if requeued:
                then = f"SLURM job {job} requeued; it resumes from there"
            else:
                failed = f"the requeue of SLURM job {job} failed; " if job else ""
                then = f"{failed}run the same command again to resume"
            print(
                f"raptor: {name} received, stopped after step {step}; "
                f"checkpoint {self.checkpoint}; {then}",
                file=sys.stderr,
                flush=True,
            )
        return Stopped(signum, step, self.checkpoint, job if requeued else None)

    def _raise_if_stopped(self) -> None:
        if self._stopped is not None:
            self._restore()
            raise self._stopped

    # the first hooks after a stopping batch: its metrics have been logged by then
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._raise_if_stopped()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._raise_if_stopped()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._raise_if_stopped()

    # ------------------------------------------------------------ the end

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
        if trainer.is_global_zero:
            remove_stale_hpc(Path(trainer.default_root_dir), self.checkpoint)


__all__ = ["Preemption", "Stopped", "remove_stale_hpc", "requeue_job", "slurm_job_id"]
