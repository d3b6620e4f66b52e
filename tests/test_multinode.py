"""Two nodes on one machine: two `launch/torchrun.sh` launches (`--nnodes=2`, one process
each, static rendezvous on 127.0.0.1, gloo) running `trainer.num_nodes=2` see the same data
split and losses as two devices on one node, and resume the same way after both nodes are
killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fit_overrides
from test_distill_runs import (
    TIMEOUT,
    assert_same_weights,
    config_file,
    losses_by_step,
    raptor_state,
    run_cli,
)

TORCHRUN = Path(__file__).resolve().parents[1] / "launch" / "torchrun.sh"


def start_node(rank: int, port: int, cfg: Path, args: list[str], log: Path) -> subprocess.Popen:
    """One node of a 2-node torchrun job: its own session, so it can be killed as a whole."""
    env = {
        **os.environ,
        "NNODES": "2",
        "NODE_RANK": str(rank),
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHON": sys.executable,
        "WANDB_SILENT": "true",
    }
    with open(log, "a") as out:
        return subprocess.Popen(
            ["bash", str(TORCHRUN), "fit", str(cfg), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL to the node's torchrun and its worker (a node lost with everything on it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_two_nodes_match_two_devices_and_resume(tiny_teacher, digits_shards, tmp_path, free_port):
    steps = 20
    common = fit_overrides(
        tiny_teacher,
        digits_shards,
        **{
            "train.stage1.steps": steps,
            "train.ckpt_every_n_steps": 5,
            "train.val_every_n_steps": 10,
            "train.val_batches": 2,
            "data.batch_size": 8,
            "trainer.deterministic": True,
        },
    )
    cfg = config_file(tmp_path)
    # the reference: one node, two devices (Lightning starts the second process)
    ref = tmp_path / "ref"
    run_cli(cfg, [*common, f"run_dir={ref}", "trainer.devices=2"])

    run, log = tmp_path / "two_nodes", tmp_path / "nodes.log"
    args = [*common, f"run_dir={run}", "logging.wandb=offline"]
    nodes = [start_node(r, free_port, cfg, args, log) for r in (0, 1)]
    last = run / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not last.exists() and all(p.poll() is None for p in nodes):
            assert time.monotonic() < deadline, "no checkpoint before the timeout"
            time.sleep(0.02)
        running = all(p.poll() is None for p in nodes)
    finally:
        for proc in nodes:
            kill_node(proc)
    assert running and last.exists(), (
        f"a node ended before the first checkpoint:\n{log.read_text()[-3000:]}"
    )
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < steps

    # the same two launches again: both nodes resume from the run folder's last.ckpt
    nodes = [start_node(r, free_port, cfg, args, log) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in nodes]
    finally:
        for proc in nodes:
            kill_node(proc)
    assert codes == [0, 0], log.read_text()[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == steps

    # same global batches at every step: the node ranks split the data as the device ranks do
    two, one = losses_by_step(run), losses_by_step(ref)
    assert sorted(one) == list(range(steps))
    # the killed segment may lose the row of the step after its checkpoint
    assert set(range(steps)) - set(two) <= {killed_at - 1}, sorted(two)
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, two[step], one[step])
    assert_same_weights(raptor_state(run), raptor_state(ref), atol=1e-5)
    # one W&B run across the restart, written once (by global rank 0, not by each node)
    run_id = (run / "wandb_id.txt").read_text().strip()
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(run_id) for s in segments), segments
