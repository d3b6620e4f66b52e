"""Commands compose as the pipeline does: their default folders are the pipeline's step folders
(written out here by hand), run_dir overrides only the command's own folder, stored paths are
absolute, and `raptor eval` refuses what is not a stage-2 run with one line."""

from __future__ import annotations

from pathlib import Path

from raptor.cli import main as cli_main
from raptor.config import load_config
from raptor.pipeline import pipeline_steps
from raptor.run_folders import absolute_paths, command_folder, run_folders

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_default_folders_are_the_pipelines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "demo"
    cfg = load_config(DEMO, ["model.k=3", "train.stage=2"])
    want = {
        "teacher": runs / "teacher",
        "phases": runs / "phases",
        "fit": runs / "k3" / "stage2",
        "eval": runs / "k3" / "eval",
        "dmd": runs / "dmd",
    }
    assert {c: command_folder(cfg, c) for c in want} == want
    assert run_folders(cfg).shards == runs / "shards"
    # the pipeline's steps, in its default root, sit in the same folders
    steps = {s.name: s.folder for s in pipeline_steps(cfg, run_folders(cfg).root)}
    assert steps == {
        "shards": runs / "shards",
        "teacher": runs / "teacher",
        "phases": runs / "phases",
        **{f"k{k}/{s}": runs / f"k{k}" / s for k in (2, 3) for s in ("stage1", "stage2", "eval")},
        **{f"k{k}/export": runs / f"k{k}" / "export" for k in (2, 3)},
        "probe/cls": runs / "probe" / "cls",  # the demo's pipeline.probes
        "analyze": runs / "analysis",  # the demo's pipeline.analyze
    }
    # run_dir moves the command's own folder (or the pipeline's root), never the shards
    moved = load_config(DEMO, [f"run_dir={tmp_path / 'elsewhere'}"])
    assert command_folder(moved, "phases") == tmp_path / "elsewhere"
    assert run_folders(moved, moved.run_dir).shards == runs / "shards"
    steps = {s.name: s.folder for s in pipeline_steps(moved, tmp_path / "elsewhere")}
    assert steps["shards"] == runs / "shards"
    assert steps["k2/stage1"] == tmp_path / "elsewhere" / "k2" / "stage1"


def test_stored_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(
        load_config(
            None,
            [
                "teacher.weights=t/teacher.safetensors",
                "teacher.head=~/head.pth",
                "data.shards_dir=s",
                "phases.file=p/phases.json",
                "train.init_from=a/block1, /abs/block2",
            ],
        )
    )
    assert cfg.teacher.weights == str(tmp_path / "t" / "teacher.safetensors")
    assert cfg.teacher.head == str(Path.home() / "head.pth")
    assert (cfg.data.shards_dir, cfg.phases.file) == (
        str(tmp_path / "s"),
        str(tmp_path / "p" / "phases.json"),
    )
    assert cfg.train.init_from == f"{tmp_path / 'a' / 'block1'},/abs/block2"


def test_eval_refuses_what_is_not_a_whole_raptor(tmp_path, capsys):
    from test_export import make_raptor, make_teacher_file, write_checkpoint

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["eval", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint not found" in err and "run folder" in err

    teacher = make_teacher_file(tmp_path / "teacher.safetensors")
    run = tmp_path / "k2" / "stage1"
    write_checkpoint(run, teacher, make_raptor(2), stage=1, blocks=[1])
    assert cli_main(["eval", str(run)]) == 2  # a stage-1 run of one block of two
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "block(s) [1] of 2" in err and "commas" in err
    assert not (run / "eval").exists()
