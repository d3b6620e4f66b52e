"""`raptor fit` as a user runs it (the CLI in a subprocess): 2-process DDP on CPU (gloo)
against one process, and SIGKILL / SIGTERM / SIGINT + resume against an uninterrupted run,
W&B offline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fit_overrides, read_csv

from raptor.config import load_config
from raptor.train import fit as distill

TIMEOUT = 240


def cli(config: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "raptor.cli", "fit", str(config), *args]


def run_cli(config: Path, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(config, args), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "fit.yaml"
    path.write_text("name: test\ntrain:\n  stage: 1\n")
    return path


def raptor_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("raptor.")}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"largest weight difference {worst}"


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {
        int(r["step"]): float(r["train/loss"])
        for r in read_csv(run_dir / "metrics.csv")
        if r.get("train/loss")
    }


def test_ddp_two_processes_match_one_process(tiny_teacher, digits_shards, tmp_path):
    """Same global batch (2 x 8 vs 1 x 16) over one training shard read in order: the two
    ranks take every other sample of it, so the global batches are the same samples."""
    steps = 6
    common = fit_overrides(
        tiny_teacher,
        digits_shards,
        **{
            "data.train_urls": str(digits_shards / "train-000000.tar"),
            "data.shuffle_buffer": 1,
            "train.stage1.steps": steps,
            "train.val_every_n_steps": steps,
            "train.val_batches": "null",
            "train.ckpt_every_n_steps": steps,
            "trainer.deterministic": True,
        },
    )
    cfg = config_file(tmp_path)
    run_cli(cfg, [*common, f"run_dir={tmp_path / 'ddp'}", "data.batch_size=8", "trainer.devices=2"])
    distill.fit(load_config(cfg, [*common, "data.batch_size=16"]), tmp_path / "one")
    ddp, one = losses_by_step(tmp_path / "ddp"), losses_by_step(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(steps))
    for step in range(steps):
        assert ddp[step] == pytest.approx(one[step], rel=1e-5), (step, ddp, one)
    assert_same_weights(raptor_state(tmp_path / "ddp"), raptor_state(tmp_path / "one"), atol=1e-5)
    # validation: every sample once across ranks (padding rows ignored), metrics merged
    val = [
        {k: v for k, v in r.items() if k.startswith("val") and v}
        for r in (read_csv(tmp_path / d / "metrics.csv")[-1] for d in ("ddp", "one"))
    ]
    assert val[0].keys() == val[1].keys() and "val/r2/L4" in val[0]
    for key in val[1]:
        assert float(val[0][key]) == pytest.approx(float(val[1][key]), rel=1e-4, abs=1e-6), key


def wait_for_new_checkpoint(path: Path, procs: list, after: float = 0.0) -> None:
    """Until `path` exists with an mtime > `after` (a periodic checkpoint: training runs)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if path.exists() and path.stat().st_mtime > after:
            return
        time.sleep(0.02)
    errors = [p.communicate(timeout=60)[1][-2000:] for p in procs if p.poll() is not None]
    pytest.fail(f"no new checkpoint {path} while the run was alive: {errors}")


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


STOP_LINE = re.compile(
    r"raptor: (SIG\w+) received, stopped after step (\d+); checkpoint (\S+); (.*)"
)


def stop_line(stderr: str) -> re.Match:
    """The one line a stopped run prints: (signal, step, checkpoint, what to do)."""
    lines = [m for m in map(STOP_LINE.search, stderr.splitlines()) if m]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


STEPS = 30  # stage-1 steps of the interrupted runs: checkpoints every 5, validations at 15, 30


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher, digits_shards, tmp_path_factory):
    """(overrides, run folder) of the stage-1 run the interrupted runs must reproduce, run once
    in this process without W&B."""
    common = fit_overrides(
        tiny_teacher,
        digits_shards,
        **{
            "train.stage1.steps": STEPS,
            "train.ckpt_every_n_steps": 5,
            "train.val_every_n_steps": 15,
            "train.val_batches": 2,
            "trainer.deterministic": True,
        },
    )
    ref = tmp_path_factory.mktemp("uninterrupted") / "run"
    distill.fit(load_config(None, common), ref)
    return common, ref


def test_killed_or_stopped_run_resumes_equal_to_uninterrupted_run(uninterrupted, tmp_path):
    """The same command four times: SIGKILL mid-run (resumes from the last periodic
    checkpoint), SIGTERM and SIGINT (checkpoint at the stopping step, exit 143 / 130, one
    line naming it), then to the end: the weights of an uninterrupted run, one W&B run."""
    steps, (common, ref) = STEPS, uninterrupted
    cfg, run = config_file(tmp_path), tmp_path / "run"
    args = [*common, f"run_dir={run}", "logging.wandb=offline"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    last, mtime, stopped_at = run / "checkpoints" / "last.ckpt", 0.0, 0
    for sig, status in ((signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = subprocess.Popen(
            cli(cfg, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        wait_for_new_checkpoint(last, [proc], after=mtime)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == status, err[-3000:]
        step = ckpt_step(last)
        assert stopped_at < step < steps  # mid-run, and mid-epoch (an epoch is 89 batches)
        rows = read_csv(run / "metrics.csv")
        logged = {int(r["step"]) for r in rows if r.get("train/loss")}
        if sig == signal.SIGKILL:
            killed_at = step
        else:  # stopped after the step its checkpoint holds, once that step was logged
            line = stop_line(err)
            assert (line[1], int(line[2]), Path(line[3])) == (sig.name, step, last)
            assert line[4] == "run the same command again to resume"
            assert "done" not in out  # no final validation after a stop
            assert max(logged) == step - 1
        # the killed segment flushed its rows at the checkpoint, but the row of the step
        # that produced it is logged after the checkpoint and may be lost with the process
        assert set(range(step)) - logged <= {killed_at - 1}, sorted(logged)
        stopped_at, mtime = step, last.stat().st_mtime
    run_cli(cfg, args)  # the same command again: resume=auto
    assert ckpt_step(last) == steps
    assert_same_weights(raptor_state(run), raptor_state(ref), atol=1e-6)
    # every segment wrote to the same W&B run, offline; the metrics are in its files and CSV
    run_id = (run / "wandb_id.txt").read_text().strip()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 4 and all(s.name.endswith(run_id) for s in segments), segments
    data = b"".join(p.read_bytes() for p in segments[-1].glob("*.wandb"))
    for key in (
        b"train/loss",
        b"train/r",
        b"val/r2/L4",
        b"val/r2_patch/L4",
        b"val/r2_ref/L4",
        b"val_identity/r2/L4",
        b"val/top1_teacher",
        b"val/top1_student_B2",
    ):
        assert key in data, key
    assert_same_rows(run, ref, steps)


def rows_by_step(run_dir: Path) -> dict[int, list[dict]]:
    """metrics.csv rows by step: their non-empty values, timing (train/img_s) left out."""
    out: dict[int, list[dict]] = {}
    for row in read_csv(run_dir / "metrics.csv"):
        values = {k: float(v) for k, v in row.items() if v and k not in ("step", "train/img_s")}
        out.setdefault(int(row["step"]), []).append(values)
    return out


def assert_same_rows(run: Path, ref: Path, steps: int) -> None:
    """metrics.csv: one training row per step and one validation row per validation (after
    15 and 30 optimizer steps, logged at their last batch's step), equal to the reference's."""
    got, want = rows_by_step(run), rows_by_step(ref)
    assert sorted(s for s, rows in got.items() for r in rows if "train/loss" in r) == list(
        range(steps)
    )
    assert sorted(s for s, rows in got.items() for r in rows if "val/r2/L4" in r) == [14, 29]
    assert got.keys() == want.keys()
    for step, rows in want.items():
        assert len(got[step]) == len(rows), step
        for a, b in zip(got[step], rows):
            assert a.keys() == b.keys(), step
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True), step


def test_sigkill_right_after_validation_keeps_its_row(uninterrupted, tmp_path):
    """The checkpoint after a validation becomes last.ckpt only after it: a run killed as
    the validation at step 15 ends resumes from before it and validates again."""
    steps, (common, ref) = STEPS, uninterrupted
    cfg, run = config_file(tmp_path), tmp_path / "run"
    args = [*common, f"run_dir={run}"]
    proc = subprocess.Popen(
        cli(cfg, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    done = run / "val_metrics.json"
    deadline = time.monotonic() + TIMEOUT
    while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate(timeout=60)[1]
    assert alive and done.exists(), f"run ended before its validation: {err[-2000:]}"
    assert ckpt_step(run / "checkpoints" / "last.ckpt") <= 15
    run_cli(cfg, args)
    assert_same_weights(raptor_state(run), raptor_state(ref), atol=1e-6)
    assert_same_rows(run, ref, steps)
