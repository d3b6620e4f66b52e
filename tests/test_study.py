"""`raptor study`: a study file expands into cells; a 2-seed study on a tiny teacher runs in
this process with its shards and phases computed once, a failing cell reported while the
others finish, a rerun skipping the finished cells, an aggregate equal to a direct
computation from the cells' eval.json files, and `--slurm` submitting only the unfinished
cells; the array task entry point (launch/slurm/study_array.sbatch, SLURM_ARRAY_TASK_ID
set, no cluster) runs a 2-cell study whose cells share one teacher trained once."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import fit_overrides

from raptor.cli import main as cli_main
from raptor.config import ConfigError
from raptor.study.aggregate import partition_contrast
from raptor.study.execute import cell_config
from raptor.study.spec import load_study, random_partitions
from raptor.train.runs import wandb_settings

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "study_array.sbatch"


def write_study(path: Path, **study) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_cells_grid_entries_seeds_and_derived(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: b\nteacher:\n  depth: 6\n")
    f = write_study(
        tmp_path / "s.yaml",
        name="s",
        config="base.yaml",
        set={"train": {"stage1": {"steps": 7}}},
        grid={"teacher.drop_path_rate": [0.0, 0.5]},
        derived={"rand": {"random_partitions": {"k": 3, "count": 4, "seed": 1}}},
        cells=[{"name": "best"}, {"name": "r", "each": {"phases.boundaries": "rand"}}],
        seeds=[0, 1],
    )
    study = load_study(f, ["train.stage2.steps=5"], tmp_path / "out")
    assert len(study.cells) == (1 + 4) * 2 * 2
    c = study.cells[3]
    assert (c.name, c.group, c.entry, c.seed) == (
        "best_drop_path_rate=0.5_seed=1",
        "best_drop_path_rate=0.5",
        "best",
        1,
    )
    cfg = c.load()
    assert (cfg.teacher.drop_path_rate, cfg.train.seed, cfg.train.stage1.steps) == (0.5, 1, 7)
    assert cfg.train.stage2.steps == 5 and cfg.phases.boundaries is None
    drawn = [list(study.cells[i].load().phases.boundaries) for i in range(4, 20, 4)]
    assert drawn == random_partitions(6, 3, 4, seed=1)
    # distinct, valid, and reproducible: the same draw as a direct rng choice over all 10
    every = [list(b) for b in itertools.combinations(range(1, 6), 2)]
    picks = np.random.default_rng(1).choice(len(every), size=4, replace=False)
    assert drawn == [every[i] for i in picks] and len({tuple(b) for b in drawn}) == 4
    assert study.shared == (tmp_path / "shared").absolute()
    # W&B: the study is the group of every cell's runs, each named for its cell
    settings = wandb_settings(cell_config(study, c), tmp_path / "run", "stage1")
    assert (settings["group"], settings["name"]) == ("s", c.name)
    with pytest.raises(ConfigError, match="only 10 exist"):
        random_partitions(6, 3, 11, seed=0)
    bad = write_study(tmp_path / "bad.yaml", name="x", config="base.yaml", grids={"a": [1]})
    with pytest.raises(ConfigError, match=r"unknown keys \['grids'\]"):
        load_study(bad)
    bad = write_study(tmp_path / "bad2.yaml", name="x", config="base.yaml", set={"teacher.dept": 3})
    with pytest.raises(ConfigError, match="teacher.dept"):
        load_study(bad)


def test_partition_contrast_brute_force():
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, (7, 7))
    for b in ([3], [2, 5], [1, 2, 6]):
        phase = [sum(layer > x for x in b) for layer in range(1, 8)]
        within, across = [], []
        for i in range(7):
            for j in range(i + 1, 7):
                (within if phase[i] == phase[j] else across).append((s[i, j] + s[j, i]) / 2)
        got = partition_contrast(s, b)
        assert got["intra"] == pytest.approx(np.mean(within))
        assert got["contrast"] == pytest.approx(np.mean(within) - np.mean(across))


def tiny_set(teacher, **extra) -> dict:
    """Every cell's overrides: the distillation tests' tiny run (`fit_overrides`) on digits
    shards the study writes, phases discovered, 4 + 4 steps, 64 validation images."""
    items = dict(o.split("=", 1) for o in fit_overrides(teacher, "x"))
    for key in ("data.shards_dir", "phases.boundaries"):
        items.pop(key)
    items.update(
        {
            "data.source": "digits",
            "data.val_samples": "64",
            "phases.ks": "[2]",
            "phases.num_images": "64",
            "pipeline.ks": "[2]",
            "pipeline.export": "false",
            "train.stage1.steps": "4",
            "train.stage2.steps": "4",
            "train.val_every_n_steps": "4",
            "train.ckpt_every_n_steps": "4",
            "train.val_batches": "2",
            "logging.tensorboard": "false",
            "trainer.num_threads": "1",
            **extra,
        }
    )
    return {k: yaml.safe_load(v) for k, v in items.items()}


@pytest.fixture(scope="module")
def seeds_study(tmp_path_factory, tiny_teacher):
    """A study of 2 seeds x (a good cell, a cell whose partition does not fit the teacher)
    on the tiny teacher, run once in this process: (study file, out folder, output, rc)."""
    tmp = tmp_path_factory.mktemp("study")
    (tmp / "base.yaml").write_text("name: base\n")
    f = write_study(
        tmp / "seeds.yaml",
        name="seeds",
        config="base.yaml",
        set=tiny_set(tiny_teacher),
        cells=[{"name": "good"}, {"name": "bad", "set": {"phases.boundaries": [9]}}],
        seeds=[0, 1],
    )
    return f, tmp / "out"


def run_study(capsys, *args) -> tuple[int, str]:
    rc = cli_main(["study", *map(str, args)])
    return rc, capsys.readouterr().out


@pytest.mark.slow
def test_study_runs_shares_reports_failures_and_skips(seeds_study, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    f, out = seeds_study
    torch.set_num_threads(2)
    rc, text = run_study(capsys, f, "--out", out)
    assert rc == 1  # two cells failed, the others ran
    assert torch.get_num_threads() == 1  # each cell applies its trainer.num_threads
    shared = out.parent / "shared"
    assert sorted(p.name.split("-")[0] for p in shared.iterdir() if p.is_dir()) == [
        "phases",
        "shards",
    ]
    # the shared steps ran once, in the first cell; every other cell skipped them
    assert text.count("[pipeline] shards: running in") == 1
    assert text.count("[pipeline] shards: complete, skipped") == 3
    assert text.count("[pipeline] phases: running in") == 1  # the bad cells give theirs
    assert text.count("[pipeline] phases: complete, skipped") == 1
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("cells/*/cell.json")}
    assert {n: r["status"] for n, r in records.items()} == {
        "good_seed=0": "ok",
        "good_seed=1": "ok",
        "bad_seed=0": "failed",
        "bad_seed=1": "failed",
    }
    assert "boundaries" in records["bad_seed=0"]["error"]
    md = (out / "study.md").read_text()
    assert "2 of 4 cells finished" in md and "- bad_seed=1: failed" in md

    # the aggregate against a direct computation from the cells' eval.json files
    result = json.loads((out / "study.json").read_text())
    evs = [
        json.loads((out / "cells" / f"good_seed={s}" / "k2" / "eval" / "eval.json").read_text())
        for s in (0, 1)
    ]
    (good,) = [g for g in result["groups"] if g["group"] == "good"]
    for metric, (name, group) in {"r2": ("r2", "all"), "r2_b2_cls": ("r2_affine", "cls")}.items():
        values = [ev["student"][name][group][-1] for ev in evs]
        assert good[metric]["mean"] == pytest.approx(statistics.mean(values))
        assert good[metric]["std"] == pytest.approx(statistics.stdev(values))
    ratios = [ev["top1"]["student"] / ev["top1"]["teacher"] for ev in evs]
    assert good["top1_ratio"]["mean"] == pytest.approx(statistics.mean(ratios))
    (phases,) = [p for p in shared.glob("phases-*") if p.is_dir()]
    sim = np.load(phases / "similarity.npy")
    assert good["contrast"]["mean"] == pytest.approx(
        partition_contrast(sim, evs[0]["boundaries"])["contrast"]
    )
    assert f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" in md

    # a rerun skips the finished cells and retries the failed ones
    rc, text = run_study(capsys, f, "--out", out)
    assert rc == 1
    assert (
        "[study] good_seed=0: finished, skipped" in text
        and "good_seed=1: finished, skipped" in text
    )
    assert (
        "[study] bad_seed=0: running in" in text
        and "[pipeline] k2/stage1" not in text.split("bad_seed=0: running")[0]
    )

    # --slurm submits the unfinished cells only (sbatch stubbed: it records its arguments)
    stub = out.parent / "bin" / "sbatch"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {out.parent / "sbatch_args"}\necho 42\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    rc, text = run_study(capsys, f, "--out", out, "--slurm", "--partition=cpu")
    got = (out.parent / "sbatch_args").read_text().splitlines()
    assert rc == 0 and "submitted array job 42" in text
    assert "--array=2,3" in got and "--partition=cpu" in got and str(SBATCH) in got
    assert got[-3:] == [str(f), "--out", str(out)]


@pytest.mark.slow
def test_array_task_entry_point_shares_one_teacher(tmp_path):
    """The sbatch script run as an array task would be (SLURM_ARRAY_TASK_ID set, no
    cluster): two cells differing in stage 2's lr train one teacher between them."""
    (tmp_path / "base.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    tiny = tiny_set("unused")
    tiny.pop("teacher.weights")
    tiny.update({"teacher.depth": 4, "teacher.embed_dim": 32, "teacher.num_heads": 2})
    tiny.update({"teacher.train.epochs": 1, "data.train_samples": 128, "logging.wandb": "disabled"})
    tiny.update({"pipeline.probes": [], "pipeline.analyze": False})  # the demo's extra steps
    f = write_study(
        tmp_path / "t.yaml",
        name="t",
        config="base.yaml",
        set=tiny,
        grid={"train.stage2.lr": [0.003, 0.001]},
    )
    out = tmp_path / "out"
    env = {
        **os.environ,
        "RAPTOR": f"{sys.executable} -m raptor.cli",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    logs = []
    for task in ("0", "1", "0"):
        proc = subprocess.run(
            ["bash", str(SBATCH), str(f), "--out", str(out)],
            env={**env, "SLURM_ARRAY_TASK_ID": task},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append(proc.stdout)
    assert "[pipeline] teacher: running in" in logs[0]
    assert "[pipeline] teacher: complete, skipped" in logs[1] and "running in" in logs[1]
    assert "[study] lr=0.003: finished, skipped" in logs[2] and "[pipeline]" not in logs[2]
    assert len(list((tmp_path / "shared").glob("teacher-*/step.json"))) == 1
    result = json.loads((out / "study.json").read_text())
    assert result["finished"] == 2 and {c["cell"] for c in result["cells"]} == {
        "lr=0.003",
        "lr=0.001",
    }
