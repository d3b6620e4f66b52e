"""`raptor pipeline` end to end on the demo config shrunk to seconds: every step runs in
its own folder, the summary reports what the steps wrote, and a rerun skips them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raptor.cli import main as cli_main

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def tiny(run_dir: Path, shards: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.shards_dir={shards}",
        "teacher.depth=4",
        "teacher.embed_dim=32",
        "teacher.num_heads=2",
        "teacher.train.epochs=2",
        "phases.ks=[2]",
        "phases.num_images=64",
        "pipeline.ks=[2]",
        "train.stage1.steps=6",
        "train.stage2.steps=6",
        "train.stage1.warmup_steps=1",
        "train.stage2.warmup_steps=1",
        "train.val_every_n_steps=6",
        "train.ckpt_every_n_steps=6",
        "train.val_batches=2",
        "dmd.calib_images=64",
        "dmd.rank=8",
        "logging.progress_bar=false",
    ]


@pytest.mark.slow
def test_pipeline_runs_every_step_then_skips(tmp_path, digits_shards, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert cli_main(["pipeline", str(DEMO), *tiny(run, tmp_path / "shards")]) == 0
    out = capsys.readouterr().out
    for step in ("shards", "teacher", "phases", "k2/stage1", "k2/stage2", "k2/eval", "k2/export"):
        folder = tmp_path / "shards" if step == "shards" else run / step
        assert (folder / "step.json").is_file(), step

    ev = json.loads((run / "k2" / "eval" / "eval.json").read_text())
    teacher = json.loads((run / "teacher" / "teacher.json").read_text())
    assert ev["top1"]["teacher"] == pytest.approx(teacher["val_top1"])
    boundaries = json.loads((run / "phases" / "phases.json").read_text())["partitions"]["2"]
    assert ev["boundaries"] == boundaries

    summary = (run / "summary.md").read_text()
    assert f"| 2 | {boundaries} |" in summary
    assert f"{100 * ev['top1']['student']:.1f}%" in summary
    assert "| k | boundaries | teacher top-1 | Raptor top-1 |" in out
    assert "wandb sync " in out and str(run / "k2" / "export" / "backbone") in out
    assert (run / "phases_phases.png").is_file() and (run / "k2_eval_fidelity.png").is_file()
    # each step logs into its own offline W&B run
    assert len(list(run.glob("*/wandb/offline-run-*"))) >= 2

    from raptor import RaptorBackbone

    backbone = RaptorBackbone.from_pretrained(run / "k2" / "export" / "backbone")
    assert backbone.config["phases"]["boundaries"] == boundaries

    # rerun: every step is complete and skipped
    assert cli_main(["pipeline", str(DEMO), *tiny(run, tmp_path / "shards")]) == 0
    again = capsys.readouterr().out
    assert again.count("complete, skipped") == 7
    assert "running in" not in again
