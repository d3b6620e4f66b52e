"""`make test-slurm`, second part: `raptor study --slurm` on a real single-node SLURM cluster.

Brings up `launch/local_slurm.sh` (root; not part of `make test`, not collected by pytest),
then in a temporary folder a 2-cell study of the demo shrunk to seconds (the cells differ in
stage 2's learning rate, so they share the shards, one teacher and its phases). Checks:
`raptor study STUDY --slurm` submits one array job of 2 tasks (launch/slurm/study_array.sbatch);
both tasks end COMPLETED; both cells are finished (cells/NAME/cell.json ok); the teacher was
trained once (one shared teacher folder; the task that found it done or in progress skipped
it); study.json lists both cells' results; a resubmission submits nothing. Prints one line
per stage; exits 0 when every check passes, 1 otherwise; the daemons are stopped whatever
happens.

    sudo make test-slurm        # or: python tests/study_slurm.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from slurm_requeue import Failed, job_info, log, on_local_cluster, sh, wait_for

ROOT = Path(__file__).resolve().parents[1]

STUDY = """\
name: slurm_study
config: {demo}
set:
  data.train_samples: 128
  data.val_samples: 64
  teacher: {{depth: 4, embed_dim: 32, num_heads: 2, train: {{epochs: 1}}}}
  phases: {{ks: [2], num_images: 64}}
  pipeline: {{ks: [2], export: false}}
  train: {{stage1: {{steps: 4, warmup_steps: 1}}, stage2: {{steps: 4, warmup_steps: 1}},
          val_every_n_steps: 4, ckpt_every_n_steps: 4, val_batches: 2}}
  dmd.enabled: false
  logging: {{wandb: disabled, tensorboard: false, progress_bar: false}}
grid:
  train.stage2.lr: [0.003, 0.001]
"""


def raptor_study(*args, cwd: Path) -> str:
    return sh(sys.executable, "-m", "raptor.cli", "study", *args, cwd=cwd, timeout=300)


def scenario(work: Path, timeout: float) -> None:
    study = work / "study.yaml"
    study.write_text(STUDY.format(demo=ROOT / "configs" / "demo.yaml"))
    out = work / "out"
    text = raptor_study(study, "--out", out, "--slurm", "--cpus-per-task=1", cwd=work)
    log(text.strip().splitlines()[0])
    job = text.split("submitted array job ")[1].split(":")[0]
    tasks = [f"{job}_0", f"{job}_1"]

    def ended():
        infos = [job_info(t) for t in tasks]
        states = [i.get("JobState") for i in infos]
        return (
            infos
            if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states)
            else None
        )

    infos = wait_for(f"array job {job} to end", ended, timeout, every=2.0)
    for task, info in zip(tasks, infos, strict=True):
        if info["JobState"] != "COMPLETED" or info.get("ExitCode") != "0:0":
            logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "slurm").glob("*.out")))
            raise Failed(f"task {task} ended {info['JobState']} ({info.get('ExitCode')}):\n{logs}")
    log(f"array job {job}: both tasks COMPLETED")
    records = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/cell.json"))]
    if sorted(r["status"] for r in records) != ["ok", "ok"]:
        raise Failed(f"cell records: {records}")
    teachers = list((work / "shared").glob("teacher-*/step.json"))
    if len(teachers) != 1:
        raise Failed(f"expected one shared teacher, found {teachers}")
    logs = "".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))
    if logs.count("[pipeline] teacher: running in") != 1:
        raise Failed("the teacher step ran in more than one task (or in none):\n" + logs[-4000:])
    log("both cells finished; the teacher was trained once and shared")
    result = json.loads((out / "study.json").read_text())
    if result["finished"] != 2 or any(c.get("r2") is None for c in result["cells"]):
        raise Failed(f"study.json: {result['finished']} finished, cells {result['cells']}")
    text = raptor_study(study, "--out", out, "--slurm", cwd=work)
    if "nothing submitted" not in text:
        raise Failed(f"a resubmission of a finished study submitted: {text}")
    log("a resubmission submits nothing")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the array job")
    parser.add_argument("--keep", action="store_true", help="keep the folder after success")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("study_slurm: run as root (it installs and starts SLURM)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="raptor-study-slurm-"))
    return on_local_cluster(work, lambda: scenario(work, args.timeout), args.keep)


if __name__ == "__main__":
    sys.exit(main())
