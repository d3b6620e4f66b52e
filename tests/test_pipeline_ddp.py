"""`raptor pipeline` on two CPU ranks (`trainer.devices=2`, gloo): Lightning starts the
second process at the first training step, which runs the pipeline from there with rank 0.
The demo's digits have one validation shard, so rank 1 reads no validation image at all:
every step must still finish, count each image once, and report what one process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import DEMO, demo_overrides

from raptor.config import load_config
from raptor.model.teacher import Teacher
from tests.test_teacher_train import val_accuracy

TIMEOUT = 600


@pytest.mark.slow
def test_pipeline_on_two_ranks_finishes_and_counts_every_image_once(tmp_path):
    run, shards = tmp_path / "run", tmp_path / "shards"
    args = [*demo_overrides(run, shards), "trainer.devices=2", "logging.wandb=disabled"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "raptor.cli", "pipeline", str(DEMO), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in shards.glob("val-*.tar")] == ["val-000000.tar"]
    steps = ["teacher", "phases", "k2/stage1", "k2/stage2", "k2/eval", "k2/export"]
    for step in [*steps, "probe/cls", "analysis"]:
        assert (run / step / "step.json").is_file(), step
    # the teacher's val top-1, synced over the ranks, is its accuracy on all 359 images
    result = json.loads((run / "teacher" / "teacher.json").read_text())
    cfg = load_config(DEMO, [*args, f"teacher.weights={result['weights']}"])
    cfg.data.shards_dir = str(shards)
    assert val_accuracy(Teacher.from_config(cfg.teacher), cfg.data) == pytest.approx(
        result["val_top1"], abs=1e-6
    )
    assert json.loads((run / "phases" / "phases.json").read_text())["num_images"] == 64
    for split, rows in (("train", 1438), ("val", 359)):  # one cache over both ranks' parts
        cache = run / "probe" / "cache" / "cls" / "k2" / f"L4-{split}" / "cache.json"
        assert json.loads(cache.read_text())["rows"] == rows
    assert json.loads((run / "analysis" / "analysis.json").read_text())["images"] == 32
    assert "## Probes" in (run / "summary.md").read_text()
