"""The README's "Step by step" commands, read from the README and run in order on digits with
tiny settings, give the pipeline's files and numbers; and a command whose input is missing
names the command that makes it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from raptor.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# few steps and epochs; the same for the commands and the pipeline
TINY = [
    "teacher.depth=4",
    "teacher.embed_dim=32",
    "teacher.num_heads=2",
    "teacher.train.epochs=1",
    "phases.ks=[3]",
    "phases.num_images=64",
    "pipeline.ks=[3]",
    "train.stage1.steps=4",
    "train.stage2.steps=4",
    "train.stage1.warmup_steps=1",
    "train.stage2.warmup_steps=1",
    "train.val_every_n_steps=4",
    "train.ckpt_every_n_steps=4",
    "train.val_batches=2",
    "dmd.calib_images=64",
    "dmd.rank=8",
    "probe.epochs=1",
    "analyze.images=32",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


def readme_steps() -> list[list[str]]:
    """The `raptor ...` lines of the README's first code block under "### Step by step"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Step by step", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]


def run(argv: list[str]) -> None:
    """`raptor ...` in this process, the config path made absolute and TINY appended."""
    assert argv[0] == "raptor"
    args = [str(ROOT / a) if a.endswith(".yaml") else a for a in argv[1:]]
    if any(a.endswith(".yaml") for a in args):
        args += TINY
    assert cli_main(args) == 0, argv


def numbers(node, prefix=""):
    """Dotted key -> value of every number in a JSON tree."""
    if isinstance(node, dict):
        return {
            k: v for key, val in node.items() for k, v in numbers(val, f"{prefix}{key}.").items()
        }
    if isinstance(node, list):
        return {
            k: v for i, val in enumerate(node) for k, v in numbers(val, f"{prefix}{i}.").items()
        }
    return {prefix[:-1]: node} if isinstance(node, (int, float)) else {}


@pytest.mark.slow
def test_readme_steps_give_the_pipelines_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = readme_steps()
    assert [s[1] for s in steps] == ["shards", "teacher", "phases", "fit", "fit", "eval", "export"]
    for argv in steps:
        run(argv)
    run(["raptor", "pipeline", str(DEMO), f"run_dir={tmp_path / 'pipe'}"])

    mine, pipe = tmp_path / "runs" / "demo", tmp_path / "pipe"
    for rel in (
        "teacher/teacher.safetensors",
        "phases/phases.json",
        "k3/stage1/checkpoints/last.ckpt",
        "k3/stage2/checkpoints/last.ckpt",
        "k3/eval/eval.json",
        "k3/export/backbone/model.safetensors",
        "k3/export/backbone/config.json",
    ):
        assert (mine / rel).is_file() and (pipe / rel).is_file(), rel
    assert json.loads((mine / "phases/phases.json").read_text()) == json.loads(
        (pipe / "phases/phases.json").read_text()
    )
    got, want = (numbers(json.loads((r / "k3/eval/eval.json").read_text())) for r in (mine, pipe))
    assert got.keys() == want.keys()
    assert {k: pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in got.items()} == want
    assert any(k.startswith("dmd.") for k in got) and "top1.student" in got
    # paths stored in the runs are absolute: export reads the run from another folder
    cfg = yaml.safe_load((mine / "k3/stage2/config.yaml").read_text())
    for value in (
        cfg["teacher"]["weights"],
        cfg["phases"]["file"],
        cfg["train"]["init_from"],
        cfg["data"]["shards_dir"],
    ):
        assert Path(value).is_absolute() and Path(value).exists(), value
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli_main(["export", str(mine / "k3/stage2"), "--out", "backbone"]) == 0
    assert (elsewhere / "backbone/model.safetensors").is_file()
    stored = json.loads((mine / "k3/export/backbone/config.json").read_text())
    assert (
        stored["phases"]["boundaries"]
        == json.loads((mine / "phases/phases.json").read_text())["partitions"]["3"]
    )


def test_missing_inputs_name_the_command_that_makes_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["phases", str(DEMO)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"`raptor teacher {DEMO}`" in err
    weights = tmp_path / "runs/demo/teacher/teacher.safetensors"
    assert str(weights) in err

    from raptor.config import load_config
    from raptor.model.teacher import Teacher

    cfg = load_config(DEMO, [*TINY, "teacher.init=random"])
    weights.parent.mkdir(parents=True)
    Teacher.from_config(cfg.teacher).save(weights)
    assert cli_main(["phases", str(DEMO), *TINY]) == 2  # the teacher is found, not the shards
    assert f"`raptor shards write {DEMO}`" in capsys.readouterr().err
    run(["raptor", "shards", "write", str(DEMO)])
    capsys.readouterr()
    (tmp_path / "runs/demo/phases").mkdir(parents=True)
    (tmp_path / "runs/demo/phases/phases.json").write_text(
        json.dumps({"num_layers": 4, "partitions": {"3": [1, 2]}})
    )
    assert cli_main(["fit", str(DEMO), *TINY, "model.k=3", "stage=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"`raptor fit {DEMO} model.k=3 stage=1`" in err
    assert not (tmp_path / "runs/demo/k3/stage2").exists()
