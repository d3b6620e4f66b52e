"""`raptor fit` as a user runs it (the CLI in a subprocess): 2-process DDP on CPU (gloo)
against one process, and SIGKILL + resume against an uninterrupted run, W&B offline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distill import overrides, read_csv, write_teacher

from raptor import distill
from raptor.config import load_config

TIMEOUT = 240


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("runs") / "teacher.safetensors")


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


def test_ddp_two_processes_match_one_process(teacher, digits_shards, tmp_path):
    """Same global batch (2 x 8 vs 1 x 16) over one training shard read in order: the two
    ranks take every other sample of it, so the global batches are the same samples."""
    steps = 6
    common = overrides(
        teacher,
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


def rows_by_step(run_dir: Path) -> dict[int, list[dict]]:
    """metrics.csv rows by step: their non-empty values, timing (train/img_s) left out."""
    out: dict[int, list[dict]] = {}
    for row in read_csv(run_dir / "metrics.csv"):
        values = {k: float(v) for k, v in row.items() if v and k not in ("step", "train/img_s")}
        out.setdefault(int(row["step"]), []).append(values)
    return out


def kill_when(proc: subprocess.Popen, ready) -> str:
    """SIGKILL `proc` as soon as `ready()`; returns its stderr. Fails if it ended first."""
    deadline = time.monotonic() + TIMEOUT
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate(timeout=60)[1]
    assert alive and ready(), f"run ended before it was to be killed: {err[-2000:]}"
    return err


def test_sigkill_then_resume_equals_uninterrupted_run(teacher, digits_shards, tmp_path):
    """Killed once after its first checkpoint and once right after a validation, then
    resumed: the same weights and the same metrics.csv rows as an uninterrupted run."""
    steps = 30
    common = overrides(
        teacher,
        digits_shards,
        **{
            "train.stage1.steps": steps,
            "train.ckpt_every_n_steps": 5,
            "train.val_every_n_steps": 15,
            "train.val_batches": 2,
            "trainer.deterministic": True,
        },
    )
    # the reference: the same run without interruption (in this process, no W&B)
    ref = tmp_path / "ref"
    distill.fit(load_config(None, common), ref)
    cfg, run = config_file(tmp_path), tmp_path / "run"
    args = [*common, f"run_dir={run}", "logging.wandb=offline"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    last = run / "checkpoints" / "last.ckpt"

    def start():
        return subprocess.Popen(
            cli(cfg, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )

    kill_when(start(), last.exists)
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < steps  # mid-run, and mid-epoch (an epoch is 89 batches)
    # the same command again (resume=auto), killed as soon as the validation at 15 is written
    kill_when(start(), (run / "val_metrics.json").exists)
    assert killed_at <= torch.load(last, weights_only=True)["global_step"] < steps
    run_cli(cfg, args)  # and again, to the end
    assert torch.load(last, weights_only=True)["global_step"] == steps
    assert_same_weights(raptor_state(run), raptor_state(ref), atol=1e-6)
    # the three segments wrote to the same W&B run, offline; the metrics are in its files
    run_id = (run / "wandb_id.txt").read_text().strip()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 3 and all(s.name.endswith(run_id) for s in segments), segments
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
    # metrics.csv: one training row per step and one validation row per validation (after
    # 15 and 30 optimizer steps, logged at their last batch's step), as in the reference
    got, want = rows_by_step(run), rows_by_step(ref)
    train = sorted(s for s, rows in got.items() for r in rows if "train/loss" in r)
    assert train == list(range(steps))
    assert sorted(s for s, rows in got.items() for r in rows if "val/r2/L4" in r) == [14, 29]
    assert got.keys() == want.keys()
    for step, rows in want.items():
        assert len(got[step]) == len(rows), step
        for a, b in zip(got[step], rows):
            assert a.keys() == b.keys(), step
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True), step
