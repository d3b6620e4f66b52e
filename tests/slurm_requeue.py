"""`make test-slurm`: `launch/slurm/fit.sbatch` on a real single-node SLURM cluster, requeued
mid-run, against the same job left alone.

Brings up `launch/local_slurm.sh` (root, apt: not part of `make test`, and not collected by
pytest), then in a temporary folder: digits shards, a tiny teacher (`raptor teacher`), and
a tiny stage-1 config. Two jobs of 2 CPU ranks each (`--ntasks-per-node=2 --cpus-per-task=1`):

* the reference, run to the end untouched;
* the same job, requeued while it trains: `scancel --signal=USR1` twice (what
  `--signal=USR1@120` delivers before a time limit: the job saves and requeues itself), then
  `scontrol requeue` once (a hard requeue: the job is killed and resumes from its last
  periodic checkpoint).

Every wait has a timeout (a delivery that hangs the job fails the test). The requeued job must
finish with the reference's global step and weights (1e-5), Restarts equal to the number of
requeues, and one W&B run id (offline) across all its segments. Prints one line per stage;
exits 0 when every check passes, 1 otherwise. The daemons are stopped whatever happens.

    sudo make test-slurm        # or: python tests/slurm_requeue.py [--keep] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "local_slurm.sh"
SBATCH = ROOT / "launch" / "slurm" / "fit.sbatch"
WEIGHT_TOL = 1e-5


class Failed(Exception):
    """A check or a wait that did not pass; the message says which."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd, timeout: float = 60, check: bool = True, **kw) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and proc.returncode != 0:
        raise Failed(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def wait_for(what: str, cond, timeout: float, every: float = 1.0):
    """Polls `cond()` until it returns something truthy; Failed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------- the job


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = sh("scontrol", "show", "job", "--oneliner", job, check=False)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def ckpt_step(run_dir: Path) -> int:
    """Global step of the run folder's periodic checkpoint (-1 before the first one)."""
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


class Job:
    """One submission of the sbatch script; `log_file` collects all its restarts."""

    def __init__(self, work: Path, config: Path, name: str, overrides: list[str]):
        self.run_dir = work / name
        self.log_file = work / f"{name}.out"
        out = sh(
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            f"--output={self.log_file}",
            SBATCH,
            config,
            f"run_dir={self.run_dir}",
            *overrides,
            cwd=work,
        )
        self.id = out.strip().split(";")[0]
        log(f"{name}: submitted job {self.id}")

    def info(self) -> dict[str, str]:
        return job_info(self.id)

    def running_after(self, restarts: int, step: int, timeout: float) -> int:
        """Waits until restart `restarts` of the job runs and has checkpointed past `step`."""

        def ready():
            info = self.info()
            if info.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"):
                raise Failed(f"job {self.id} ended ({info.get('JobState')}) before step {step}")
            if info.get("JobState") != "RUNNING" or int(info.get("Restarts", -1)) != restarts:
                return None
            now = ckpt_step(self.run_dir)
            return now if now > step else None

        return wait_for(f"job {self.id} (restart {restarts}) past step {step}", ready, timeout)

    def requeued(self, restarts: int, timeout: float) -> None:
        """Waits until SLURM counts `restarts` restarts and the job is back in the
        queue (the delivery led to a requeue), then makes it eligible at once: SLURM holds a
        requeued job for about two minutes, and only a PENDING job's StartTime can be set."""

        def back_in_queue():
            info = self.info()
            return int(info.get("Restarts", -1)) >= restarts and info.get("JobState") in (
                "PENDING",
                "RUNNING",
            )

        wait_for(f"job {self.id} to be requeued (Restarts={restarts})", back_in_queue, timeout)
        sh("scontrol", "update", f"JobId={self.id}", "StartTime=now", check=False)

    def finished(self, timeout: float) -> dict[str, str]:
        def done():
            info = self.info()
            return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") else None

        info = wait_for(f"job {self.id} to finish", done, timeout)
        if info["JobState"] != "COMPLETED" or info.get("ExitCode") != "0:0":
            raise Failed(
                f"job {self.id} ended {info['JobState']} (ExitCode {info.get('ExitCode')})"
            )
        return info

    def tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return f"({self.log_file} not written)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- inputs


def raptor(*args, timeout: float = 600) -> None:
    sh(sys.executable, "-m", "raptor.cli", *args, timeout=timeout)


def write_inputs(work: Path, steps: int) -> tuple[Path, Path]:
    """Digits shards, the stage-1 config, and a tiny teacher trained on them for one epoch."""
    shards, teacher_dir = work / "shards", work / "teacher"
    raptor("shards", "--source", "digits", "--out", shards, "--shard-size", "256")
    config = work / "fit.yaml"
    config.write_text(
        f"""\
name: slurm-requeue
data:
  shards_dir: {shards}
  batch_size: 16
  num_workers: 0
  shuffle_buffer: 64
  transform: {{input_size: 8, crop_pct: 1.0, interpolation: bilinear,
              mean: [0.3053, 0.3053, 0.3053], std: [0.3760, 0.3760, 0.3760]}}
teacher:
  name: vit_tiny_patch16_224
  img_size: 8
  patch_size: 2
  reg_tokens: 2
  embed_dim: 32
  depth: 4
  num_heads: 2
  mlp_ratio: 2.0
  num_classes: 10
  train: {{epochs: 1, warmup_epochs: 0}}
model: {{k: 2, mlp_ratio: 2.0}}
phases: {{boundaries: [2]}}
train:
  stage: 1
  ckpt_every_n_steps: 10
  val_every_n_steps: {steps}
  val_batches: 2
  stage1: {{steps: {steps}, warmup_steps: 5, lr: 3.0e-3}}
dmd: {{enabled: false}}
logging: {{wandb: offline, log_every_n_steps: 1, progress_bar: false}}
trainer: {{accelerator: cpu, num_threads: 1, deterministic: true}}
"""
    )
    raptor("teacher", config, f"run_dir={teacher_dir}", "logging.wandb=disabled")
    teacher = teacher_dir / "teacher.safetensors"
    if not teacher.is_file():
        raise Failed(f"raptor teacher wrote no {teacher}")
    return config, teacher


# --------------------------------------------------------------------------- checks


def raptor_weights(run_dir: Path) -> tuple[int, dict]:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["global_step"], {
        k: v for k, v in ckpt["state_dict"].items() if k.startswith("raptor.")
    }


def check_same_run(ref: Job, job: Job, steps: int, requeues: int, wandb_id: str) -> None:
    ref_step, ref_w = raptor_weights(ref.run_dir)
    step, w = raptor_weights(job.run_dir)
    if not ref_step == step == steps:
        raise Failed(f"global step: reference {ref_step}, requeued {step}, expected {steps}")
    if ref_w.keys() != w.keys():
        raise Failed(f"weights differ in keys: {sorted(ref_w.keys() ^ w.keys())}")
    worst = max((ref_w[k] - w[k]).abs().max().item() for k in w)
    if worst > WEIGHT_TOL:
        raise Failed(f"largest weight difference to the reference {worst:.3g} > {WEIGHT_TOL}")
    log(f"weights match the reference (largest difference {worst:.3g}), step {step}")
    restarts = int(job.info().get("Restarts", -1))
    if restarts != requeues:
        raise Failed(f"SLURM counts {restarts} restarts, expected {requeues}")
    final_id = (job.run_dir / "wandb_id.txt").read_text().strip()
    if final_id != wandb_id:
        raise Failed(f"W&B run id changed across requeues: {wandb_id} -> {final_id}")
    segments = sorted((job.run_dir / "wandb").glob("offline-run-*"))
    if len(segments) != requeues + 1 or not all(s.name.endswith(wandb_id) for s in segments):
        raise Failed(
            f"expected {requeues + 1} offline W&B segments of run {wandb_id}, got "
            f"{[s.name for s in segments]}"
        )
    log(f"one W&B run id across {len(segments)} segments: {wandb_id}")


# --------------------------------------------------------------------------- main


def scenario(work: Path, steps: int, timeout: float) -> None:
    log("writing shards, teacher and config")
    config, teacher = write_inputs(work, steps)
    env_note = f"RAPTOR={os.environ['RAPTOR']}"
    log(f"jobs run `{env_note} ... fit`; {steps} steps, 2 CPU ranks")

    ref = Job(work, config, "reference", [f"teacher.weights={teacher}"])
    try:
        ref.finished(timeout)
    except Failed:
        print(ref.tail(), file=sys.stderr)
        raise
    log(f"reference: finished at step {ckpt_step(ref.run_dir)}")

    job = Job(work, config, "requeued", [f"teacher.weights={teacher}"])
    plan = [  # (checkpointed past this fraction of the run, how to interrupt it)
        (0.2, ["scancel", "--signal=USR1"]),
        (0.45, ["scancel", "--signal=USR1"]),
        (0.7, ["scontrol", "requeue"]),
    ]
    wandb_id = None
    try:
        for restarts, (fraction, cmd) in enumerate(plan):
            at = job.running_after(restarts, int(fraction * steps), timeout)
            if wandb_id is None:
                wandb_id = (job.run_dir / "wandb_id.txt").read_text().strip()
                log(f"requeued: W&B run id {wandb_id}")
            log(f"requeued: restart {restarts} checkpointed step {at}; {' '.join(cmd)} {job.id}")
            sh(*cmd, job.id)
            job.requeued(restarts + 1, timeout)
            log(f"requeued: job {job.id} requeued (Restarts={restarts + 1})")
        job.finished(timeout)
    except Failed:
        print(job.tail(), file=sys.stderr)
        raise
    log(f"requeued: finished after {len(plan)} requeues")
    check_same_run(ref, job, steps, len(plan), wandb_id)


def cancel_all(timeout: float = 60) -> None:
    """Cancels every job and waits for their processes (the daemons' stop leaves them)."""
    sh("scancel", "--full", "--user", "root", check=False)
    try:
        wait_for("jobs to end", lambda: not sh("squeue", "-h", check=False).strip(), timeout)
    except Failed as err:
        log(f"warning: {err}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per job")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds allowed for each wait (default 600)"
    )
    parser.add_argument("--workdir", type=Path, help="folder for the run (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder after success")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("slurm_requeue: run as root (it installs and starts SLURM)", file=sys.stderr)
        return 2

    work = args.workdir or Path(tempfile.mkdtemp(prefix="raptor-slurm-"))
    return on_local_cluster(work, lambda: scenario(work, args.steps, args.timeout), args.keep)


def on_local_cluster(work: Path, run: Callable[[], None], keep: bool = False) -> int:
    """Start a SLURM cluster with its state in `work/slurm` (launch/local_slurm.sh), `run()`
    the scenario there (RAPTOR runs this interpreter's raptor.cli, this checkout on
    PYTHONPATH), then stop the daemons whatever happens; 0 when it passed (and `work` is
    removed unless `keep`), 1 when it raised Failed or timed out (daemon log tails printed)."""
    work.mkdir(parents=True, exist_ok=True)
    cluster_env = {**os.environ, "SLURM_DIR": str(work / "slurm")}
    os.environ.update(
        SLURM_CONF=str(work / "slurm" / "slurm.conf"),
        RAPTOR=f"{sys.executable} -m raptor.cli",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        WANDB_SILENT="true",
    )

    def stop_on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)

    ok = False
    try:
        log(f"starting SLURM (state in {work / 'slurm'})")
        sh("bash", CLUSTER, "start", timeout=900, env=cluster_env)
        run()
        ok = True
    except (Failed, subprocess.TimeoutExpired) as err:
        log(f"FAILED: {err}")
        for name in ("slurmctld.log", "slurmd.log"):
            path = work / "slurm" / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {path} (end)\n" + "\n".join(tail), file=sys.stderr)
    finally:
        if (work / "slurm" / "pids").exists():
            cancel_all()
            print(sh("bash", CLUSTER, "stop", env=cluster_env, check=False), end="")
    if ok and not keep:
        shutil.rmtree(work, ignore_errors=True)
    log("PASSED" if ok else f"FAILED (files kept in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
