"""Running a study's cells: one cell in this process, all of them locally N at a time, or
as one SLURM array job (launch/slurm/study_array.sbatch, one task per cell).

A cell is `raptor pipeline` on the cell's config in `cells/NAME`, its shared steps in the
study's shared folder (`raptor.study.share`), so it resumes like a pipeline. When it ends
it writes `cells/NAME/cell.json`: {"cell", "index", "status": ok | failed, "error",
"fingerprint" (a hash of its resolved config), "wall_s", "steps" (step -> folder)}. A
cell is finished when its cell.json says ok with the fingerprint of its current config:
a rerun or a resubmission skips it. A failed cell (any exception, or a task that died:
no cell.json) is reported, with its log, and the other cells go on.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from raptor.errors import UserError, read_json
from raptor.study.spec import Cell, Study

CELL_FILE = "cell.json"
LOG_FILE = "cell.log"
SBATCH = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "study_array.sbatch"


def cell_config(study: Study, cell: Cell) -> DictConfig:
    """The cell's pipeline config: in its folder, named for the study (its W&B group) with
    the cell's name on its W&B runs."""
    cfg = cell.load()
    cfg.run_dir = str(study.cell_dir(cell))
    cfg.name = study.name
    cfg.logging.run_name = cfg.logging.run_name or cell.name
    return cfg


def fingerprint(cfg: DictConfig) -> str:
    text = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_record(study: Study, cell: Cell) -> Optional[Dict[str, Any]]:
    path = study.cell_dir(cell) / CELL_FILE
    return read_json(path, "study cell record") if path.is_file() else None


def finished(study: Study, cell: Cell) -> bool:
    rec = cell_record(study, cell)
    return (
        bool(rec)
        and rec["status"] == "ok"
        and rec["fingerprint"] == fingerprint(cell_config(study, cell))
    )


def cell_steps(cfg: DictConfig, shared: Path) -> Dict[str, str]:
    """Step name -> the folder it runs in, for a cell's config (shared steps moved)."""
    from raptor.pipeline import pipeline_steps, plan_steps
    from raptor.run_folders import absolute_paths
    from raptor.study.share import share_steps

    cfg = absolute_paths(cfg)
    steps = pipeline_steps(cfg, Path(cfg.run_dir))
    plan_steps(steps)
    share_steps(steps, shared)
    return {s.name: str(s.folder) for s in steps}


def _write(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def run_cell(study: Study, cell: Cell) -> Dict[str, Any]:
    """Run one cell in this process unless finished; returns its record (module docstring).
    Exceptions become a failed record (traceback in cells/NAME/error.txt)."""
    from raptor.cli import apply_threads
    from raptor.pipeline import run_pipeline

    folder = study.cell_dir(cell)
    cfg = cell_config(study, cell)
    if finished(study, cell):
        print(f"[study] {cell.name}: finished, skipped")
        return cell_record(study, cell)
    print(f"[study] {cell.name}: running in {folder}", flush=True)
    record = {"cell": cell.name, "index": cell.index, "fingerprint": fingerprint(cfg)}
    start = time.perf_counter()
    apply_threads(cfg)  # as every command does: trainer.num_threads for this cell
    try:
        run_pipeline(cfg, shared=study.shared)
        record.update(status="ok", error="", steps=cell_steps(cfg, study.shared))
        (folder / "error.txt").unlink(missing_ok=True)
    except Exception as exc:  # the cell failed: report it, the study goes on
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}", steps={})
        print(f"[study] {cell.name}: FAILED: {record['error']}", flush=True)
    record["wall_s"] = round(time.perf_counter() - start, 1)
    _write(folder / CELL_FILE, record)
    return record


def _shared_folders(study: Study, cell: Cell) -> List[Path]:
    """The folders of the shared steps of `cell`."""
    steps = cell_steps(cell_config(study, cell), study.shared)
    return [Path(f) for f in steps.values() if Path(f).parent == study.shared]


def _start_cell(study: Study, cell: Cell, log: Path) -> subprocess.Popen:
    """One cell in a fresh interpreter (`raptor study FILE ... --cell I`, the SLURM array
    task's command), its output appended to `log`: a cell runs as it would on the cluster,
    with nothing inherited from this process but the environment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "raptor.cli", "study", str(study.file), *study.overrides]
    cmd += ["--out", str(study.out), "--cell", str(cell.index)]
    with open(log, "a") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)


def run_local(study: Study, jobs: int = 1) -> List[Dict[str, Any]]:
    """Run every unfinished cell, `jobs` at a time (1: in this process; more: each cell in
    its own process, `raptor study FILE --cell I`, its output in cells/NAME/cell.log). The next
    cell to start is the first one that does not wait on a shared step another running
    cell computes. Aggregates after every cell; returns the records of the cells run."""
    from raptor.study.aggregate import aggregate

    todo = [c for c in study.cells if not finished(study, c)]
    for cell in study.cells:
        if cell not in todo:
            print(f"[study] {cell.name}: finished, skipped")
    records = []
    if jobs <= 1:
        for cell in todo:
            records.append(run_cell(study, cell))
            aggregate(study)
        return records
    shared = {c.index: _shared_folders(study, c) for c in todo}

    def pending(cell: Cell) -> set:  # its shared steps not complete yet
        return {f for f in shared[cell.index] if not (f / "step.json").is_file()}

    running: Dict[int, tuple] = {}  # cell index -> (process, its pending shared steps)
    while todo or running:
        busy = set().union(*(r[1] for r in running.values())) if running else set()
        while todo and len(running) < jobs:
            pick = next((c for c in todo if not (pending(c) & busy)), todo[0])
            todo.remove(pick)
            log = study.cell_dir(pick) / LOG_FILE
            print(f"[study] {pick.name}: started (log: {log})", flush=True)
            proc = _start_cell(study, pick, log)
            running[pick.index] = (proc, pending(pick))
            busy |= running[pick.index][1]
        time.sleep(0.5)
        for index, (proc, _) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[index]
            cell = study.cells[index]
            rec = cell_record(study, cell)
            if rec is None or proc.returncode != 0 and rec["status"] == "ok":
                rec = {"cell": cell.name, "index": cell.index, "status": "failed", "steps": {}}
                rec["error"] = f"exit status {proc.returncode} without a cell record"
                _write(study.cell_dir(cell) / CELL_FILE, {**rec, "fingerprint": ""})
            print(f"[study] {cell.name}: {rec['status']} {rec.get('error', '')}", flush=True)
            records.append(rec)
            aggregate(study)
    return records


def submit_slurm(study: Study, sbatch_args: List[str], jobs: int = 0) -> Optional[str]:
    """Submit the unfinished cells as one array job of launch/slurm/study_array.sbatch
    (task id = cell index; `%jobs` at a time when jobs > 0); returns the job id, or None
    when every cell is finished."""
    todo = [c.index for c in study.cells if not finished(study, c)]
    if not todo:
        print(f"[study] {study.name}: every cell is finished, nothing submitted")
        return None
    array = ",".join(map(str, todo)) + (f"%{jobs}" if jobs > 0 else "")
    logs = study.out / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name=study-{study.name}"]
    cmd += [f"--output={logs}/%A_%a.out", *sbatch_args, str(SBATCH), str(study.file)]
    cmd += [*study.overrides, "--out", str(study.out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError("sbatch not found: --slurm needs a SLURM client on PATH") from None
    if proc.returncode != 0:
        raise UserError(f"sbatch refused the study's array: {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    print(f"[study] submitted array job {job}: cells {array} (logs in {logs})")
    print(
        f"[study] when it ends: `raptor study {study.file} --aggregate` (resubmit to rerun failed cells)"
    )
    return job
