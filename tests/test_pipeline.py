"""`raptor pipeline` end to end on the demo config shrunk to seconds: every step runs in
its own folder, the summary reports what the steps wrote, a rerun skips them all, and a
rerun with changed values reruns exactly the steps whose inputs changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import DEMO, demo_overrides
from omegaconf import OmegaConf

from raptor.cli import main as cli_main
from raptor.config import all_keys
from raptor.pipeline import DEPENDS, NO_RESULT_KEYS, _selected


@pytest.mark.slow
def test_pipeline_runs_every_step_then_skips(demo_pipeline, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, args, out = demo_pipeline
    steps = ("shards", "teacher", "phases", "k2/stage1", "k2/stage2", "k2/eval", "k2/export")
    for step in (*steps, "probe/cls"):
        folder = run.parent / "shards" if step == "shards" else run / step
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
    assert f"raptor sync {run}" in out and str(run / "k2" / "export" / "backbone") in out
    assert f"raptor dashboard {run}" in out and list(run.glob("k2/stage2/events.out.tfevents.*"))
    assert (run / "phases_phases.png").is_file() and (run / "k2_eval_fidelity.png").is_file()
    # the dynamics of the teacher and the Raptor it trained, in the summary with its plots
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    assert [m["source"] for m in analysis["models"]] == [
        "teacher",
        str(run / "k2" / "stage2" / "checkpoints" / "last.ckpt"),
    ]
    assert "## Dynamics: teacher vs Raptors" in summary and "largest gap to teacher: k2" in summary
    assert "![analyze_angular_speed](analyze_angular_speed.png)" in summary
    assert (run / "analyze_angular_speed.png").is_file()
    # each step logs into its own offline W&B run
    assert len(list(run.glob("*/wandb/offline-run-*"))) >= 2

    from raptor import RaptorBackbone

    backbone = RaptorBackbone.from_pretrained(run / "k2" / "export" / "backbone")
    assert backbone.config["phases"]["boundaries"] == boundaries
    card = (run / "k2" / "export" / "backbone" / "README.md").read_text()  # the eval's numbers
    assert f"| {100 * ev['top1']['teacher']:.2f}% | {100 * ev['top1']['student']:.2f}% |" in card
    assert f"| 1 | {ev['student']['r2']['all'][0]:.4f} |" in card

    # stage 2 started from stage 1's final weights
    start, end = (
        block_weights(run / "k2" / s / "checkpoints/last.ckpt") for s in ("stage1", "stage2")
    )
    assert start.keys() == end.keys()
    for key in start:
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=1e-7, msg=key)

    # rerun: every step is complete and skipped
    assert cli_main(args) == 0
    again = capsys.readouterr().out
    assert again.count("complete, skipped") == 9  # with the demo's probe/cls and analyze
    assert "running in" not in again


def test_every_config_key_is_placed():
    """Each schema key is a dependency of some step or listed as changing no result, never
    both: a key added to the config without a decision fails here."""
    keys = all_keys()
    leaves = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    used = {k for k in leaves if any(_selected(k, spec) for spec in DEPENDS.values())}
    free = {k for k in leaves if _selected(k, NO_RESULT_KEYS)}
    assert set(leaves) == used | free, sorted(set(leaves) - used - free)
    assert not used & free, sorted(used & free)


def snapshot(*folders: Path) -> dict:
    """path -> (mtime_ns, sha256) of every file under `folders`, W&B's own files aside (its
    background service of this test process still appends to earlier runs' debug logs)."""
    return {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for f in folders
        for p in sorted(f.rglob("*"))
        if p.is_file() and "wandb" not in p.relative_to(f).parts
    }


def block_weights(ckpt: Path) -> dict:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("raptor.")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def root_config(run: Path):
    return OmegaConf.load(run / "config.yaml")


def select(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.mark.slow
def test_pipeline_reruns_what_a_change_reaches(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, shards = tmp_path / "run", tmp_path / "shards"
    args = ["pipeline", str(DEMO), *demo_overrides(run, shards)]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert root_config(run).teacher.train.epochs == 2
    all_steps = ("teacher", "phases", "k2/stage1", "k2/stage2", "k2/eval", "k2/export")

    # 1. keys that change no result: every step is skipped, nothing is touched
    before = snapshot(shards, *(run / s for s in all_steps))
    args += ["logging.log_every_n_steps=3", "data.num_workers=2", "train.ckpt_every_n_steps=3"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 9 and "running in" not in out, out
    assert snapshot(shards, *(run / s for s in all_steps)) == before
    assert root_config(run).logging.log_every_n_steps == 3
    assert not list(run.rglob("*.stale-*"))

    # 2. a stage-2 value: stage 2, evaluation and export rerun in fresh folders
    untouched = snapshot(shards, run / "teacher", run / "phases", run / "k2" / "stage1")
    old_stage2 = block_weights(run / "k2/stage2/checkpoints/last.ckpt")
    args += ["train.stage2.lr=5e-4"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert out.count("running in") == 5, out
    for step in ("shards", "teacher", "phases", "k2/stage1"):
        assert f"{step}: complete, skipped" in out, out
    for step in ("k2/stage2", "k2/eval", "k2/export", "probe/cls", "analyze"):
        assert f"{step}: running in" in out, out
    assert "train.stage2.lr: 0.001 -> 0.0005" in out
    assert "k2/stage2 reruns" in out
    assert snapshot(shards, run / "teacher", run / "phases", run / "k2" / "stage1") == untouched
    (stale,) = (run / "k2").glob("stage2.stale-*")  # the old run, moved aside whole
    assert same(block_weights(stale / "checkpoints/last.ckpt"), old_stage2)
    # trained afresh from stage 1, not resumed from the old last.ckpt (which would keep it)
    assert not same(block_weights(run / "k2/stage2/checkpoints/last.ckpt"), old_stage2)
    assert OmegaConf.load(run / "k2/stage2/config.yaml").train.stage2.lr == 5e-4
    ev = json.loads((run / "k2/eval/eval.json").read_text())
    assert ev["checkpoint"] == str(run / "k2/stage2/checkpoints/last.ckpt")
    assert len(list((run / "k2").glob("*.stale-*"))) == 3
    assert root_config(run).train.stage2.lr == 5e-4
    (old_root,) = run.glob("run.stale-*")  # the old config.yaml and summary, moved aside
    assert OmegaConf.load(old_root / "config.yaml").train.stage2.lr == 1e-3
    assert (old_root / "summary.md").is_file() and (old_root / "k2_eval_fidelity.png").is_file()

    # 3. a teacher value: --plan only prints; the run retrains the teacher and all after it
    teacher_epochs = torch.load(run / "teacher/checkpoints/last.ckpt", weights_only=True)["epoch"]
    args += ["teacher.train.epochs=3"]
    before = snapshot(run)
    assert cli_main([*args, "--plan"]) == 0
    out = capsys.readouterr().out
    assert "teacher.train.epochs: 2 -> 3" in out and "running in" not in out
    assert snapshot(run) == before
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "shards: complete, skipped" in out
    assert out.count("running in") == 8
    assert torch.load(run / "teacher/checkpoints/last.ckpt", weights_only=True)["epoch"] == (
        teacher_epochs + 1
    )
    for step in all_steps:
        assert len(list((run / step).parent.glob(Path(step).name + ".stale-*"))) == (
            2 if step in ("k2/stage2", "k2/eval", "k2/export") else 1
        )
    cfg = root_config(run)
    assert (cfg.teacher.train.epochs, cfg.train.stage2.lr) == (3, 5e-4)
    assert json.loads((run / "k2/stage1/inputs.json").read_text())["values"]["model.k"] == 2
    for step in all_steps:  # the values each step recorded are the root config's
        inputs = json.loads((run / step / "inputs.json").read_text())["values"]
        for key, value in inputs.items():
            if key not in ("model.k", "teacher.weights", "teacher.head", "phases.file"):
                assert select(cfg, key) == value, (step, key)
