"""Signals stop a run cleanly: a signal to one rank stops every rank after the same step,
with a checkpoint, and SIGUSR1 requeues the SLURM job (SIGTERM / SIGINT of a one-process
run: tests/test_distill_runs.py); the final validation evaluates the final weights whatever
Lightning's `hpc_ckpt_*` files say; one rank helper for every launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import fit_overrides
from test_distill_runs import (
    STOP_LINE,
    TIMEOUT,
    ckpt_step,
    cli,
    config_file,
    stop_line,
    wait_for_new_checkpoint,
)

from raptor import cli as raptor_cli
from raptor import distributed
from raptor.config import load_config
from raptor.train import fit as distill
from raptor.train.preemption import requeue_job, slurm_job_id


def fake_scontrol(folder: Path, status: int = 0) -> Path:
    """An executable `scontrol` in `folder` that appends its arguments to folder/calls.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "scontrol"
    exe.write_text(f'#!/bin/sh\necho "$@" >> "{folder / "calls.txt"}"\nexit {status}\n')
    exe.chmod(0o755)
    return folder / "calls.txt"


# --------------------------------------------------------------------------- rank helper


@pytest.mark.parametrize(
    "env, rank, local, world",
    [
        ({}, 0, 0, 1),
        # torchrun (inside a SLURM allocation too, where srun's variables are the batch shell's)
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "0"}, 3, 1, 4),
        # srun: SLURM_* only
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}, 5, 1, 8),
        # Lightning's own launcher, second process of one node
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, 1, 1, 2),
    ],
)
def test_rank_from_each_launcher(monkeypatch, env, rank, local, world):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    got = (distributed.global_rank(), distributed.local_rank(), distributed.world_size())
    assert got == (rank, local, world)
    assert distributed.is_rank_zero() == (rank == 0)


def test_process_group_wins_over_the_environment(monkeypatch, free_port):
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "9")
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1
    )
    try:
        assert (distributed.global_rank(), distributed.world_size()) == (0, 1)
        assert distributed.all_max(4) == 4
    finally:
        torch.distributed.destroy_process_group()


def test_fit_prints_its_result_on_rank_zero_only(
    tiny_teacher, digits_shards, tmp_path, capsys, monkeypatch
):
    """Under srun only SLURM_PROCID tells the ranks apart."""
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = fit_overrides(
        tiny_teacher,
        digits_shards,
        **{"train.stage1.steps": 2, "train.val_batches": 1, "run_dir": str(tmp_path / "run")},
    )
    done = re.compile(r"^stage 1 done at step 2", re.M)
    for procid, printed in (("1", False), ("0", True)):  # the second run resumes the finished one
        monkeypatch.setenv("SLURM_PROCID", procid)
        assert raptor_cli.main(["fit", str(config_file(tmp_path)), *args]) == 0
        assert bool(done.search(capsys.readouterr().out)) == printed, procid


# --------------------------------------------------------------------------- requeue


def test_slurm_job_id_names_the_array_task():
    assert slurm_job_id({"SLURM_JOB_ID": "12"}) == "12"
    array = {"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm_job_id(array) == "12_3"
    assert slurm_job_id({}) is None


def test_requeue_runs_scontrol_from_path(tmp_path, monkeypatch):
    calls = fake_scontrol(tmp_path / "ok")
    monkeypatch.setenv("PATH", f"{tmp_path / 'ok'}{os.pathsep}{os.environ['PATH']}")
    assert requeue_job("12_3") is True
    assert calls.read_text() == "requeue 12_3\n"
    fake_scontrol(tmp_path / "fails", status=1)
    monkeypatch.setenv("PATH", str(tmp_path / "fails"))
    assert requeue_job("12") is False
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol at all
    assert requeue_job("12") is False


# --------------------------------------------------------------------------- signals


def test_one_rank_signalled_stops_both_ranks_and_requeues_the_array_task(
    tiny_teacher,
    digits_shards,
    tmp_path,
    free_port,
):
    """Two gloo ranks started from outside, as a launcher does (LOCAL_RANK, MASTER_ADDR...);
    SIGUSR1 to rank 1 only: both stop after the same step (otherwise their collectives would no longer
    pair up and the run would fail or hang), rank 0 alone requeues `<array job>_<task>`
    and prints, both exit 0."""
    calls = fake_scontrol(tmp_path / "bin")
    cfg, run = config_file(tmp_path), tmp_path / "run"
    args = fit_overrides(
        tiny_teacher,
        digits_shards,
        **{"train.stage1.steps": 60, "train.ckpt_every_n_steps": 5, "data.batch_size": 8},
    )
    args = [*args, f"run_dir={run}", "trainer.devices=2"]
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "SLURM_JOB_ID": "4245",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "3",
    }
    procs = [
        subprocess.Popen(
            cli(cfg, args),
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        last = run / "checkpoints" / "last.ckpt"
        wait_for_new_checkpoint(last, procs)
        procs[1].send_signal(signal.SIGUSR1)
        errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    line = stop_line(errs[0])
    assert not STOP_LINE.search(errs[1])
    assert line[1] == "SIGUSR1" and "SLURM job 4242_3 requeued" in line[4]
    assert calls.read_text() == "requeue 4242_3\n"
    assert ckpt_step(last) == int(line[2]) < 60


def test_final_validation_ignores_a_stale_hpc_checkpoint(
    tiny_teacher, digits_shards, tmp_path, monkeypatch
):
    """Under SLURM, Lightning validates the newest `hpc_ckpt_*.ckpt` of the run folder when
    given no checkpoint. A resumed run must report its own final weights, and the stale
    file goes once a newer last.ckpt exists."""
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "raptor",
        "SLURM_NODELIST": "localhost",
    }
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    run = tmp_path / "run"
    cfg = load_config(
        None,
        fit_overrides(
            tiny_teacher,
            digits_shards,
            **{"train.stage1.steps": 6, "train.val_every_n_steps": 4, "train.val_batches": 2},
        ),
    )
    first = distill.fit(cfg, run)  # validates at steps 4 and 6 (the end)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    for key, value in ckpt["state_dict"].items():
        if key.startswith("raptor."):
            value.add_(1.0)  # other weights: the stale file's validation would differ
    stale = run / "hpc_ckpt_1.ckpt"
    torch.save(ckpt, stale)
    os.utime(stale, (last.stat().st_mtime - 60,) * 2)  # older: resume=auto takes last.ckpt
    again = distill.fit(cfg, run)  # resumes the finished run and validates it once more
    assert again["step"] == first["step"] == 6
    for key in ("val/r2/L4", "val/loss", "val/cos/mean"):
        assert again["metrics"][key] == pytest.approx(first["metrics"][key], rel=1e-5), key
    assert not stale.exists()
