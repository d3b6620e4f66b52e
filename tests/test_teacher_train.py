"""`raptor teacher`: a tiny ViT trained on the digits shards with a real Lightning Trainer."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from raptor.cli import main as cli_main
from raptor.config import load_config
from raptor.data.stream import ShardDataModule
from raptor.model.teacher import Teacher
from raptor.train.teacher import TeacherTraining, train_teacher, warmup_cosine
from tests.conftest import read_csv

TINY = """
name: tiny_teacher
data:
  source: shards
  shards_dir: {shards}
  batch_size: 32
  num_workers: 0
  transform: {{input_size: 8, crop_pct: 1.0, mean: [0.3, 0.3, 0.3], std: [0.38, 0.38, 0.38]}}
teacher:
  name: vit_tiny_patch16_224
  img_size: 8
  patch_size: 2
  reg_tokens: 1
  embed_dim: 32
  depth: 2
  num_heads: 2
  mlp_ratio: 2.0
  num_classes: 10
  drop_path_rate: 0.1
  train: {{epochs: 5, lr: 3.0e-3, warmup_epochs: 1}}
logging: {{wandb: disabled, progress_bar: false}}
trainer: {{accelerator: cpu, devices: 1, num_threads: 1}}
"""


@pytest.fixture
def config_file(tmp_path, digits_shards):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(shards=digits_shards))
    return path


def val_accuracy(teacher: Teacher, data_cfg) -> float:
    """Top-1 of a loaded teacher over the validation shards, counted here."""
    data = ShardDataModule(data_cfg, teacher.data_config)
    correct = total = 0
    for batch in data.val_dataloader():
        keep = batch["valid"]
        out = teacher.finish(teacher.embed(batch["image"][keep]), 0)
        correct += int((out["logits"].argmax(-1) == batch["label"][keep]).sum())
        total += int(keep.sum())
    assert total == 359
    return correct / total


def test_teacher_trains_writes_files_and_reloads(config_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["teacher", str(config_file), f"run_dir={run}"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "teacher.json").read_text())
    assert f"val top-1 {result['val_top1']:.4f}" in printed
    assert result["weights"] == str(run / "teacher.safetensors")
    assert result["val_top1"] > 0.3  # chance is 0.1
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    with open(run / "metrics.csv") as fh:
        epochs = [int(r["epoch"]) for r in csv.DictReader(fh) if r.get("val/top1")]
    assert epochs == [0, 1, 2, 3, 4]  # validated every epoch

    # the file alone rebuilds the teacher with its preprocessing; its accuracy is the reported one
    cfg = load_config(config_file, [f"teacher.weights={result['weights']}"])
    teacher = Teacher.from_config(cfg.teacher)
    assert teacher.num_reg_tokens == 1 and teacher.num_layers == 2 and teacher.num_tokens == 18
    assert teacher.data_config["mean"] == (0.3, 0.3, 0.3)
    assert val_accuracy(teacher, cfg.data) == pytest.approx(result["val_top1"], abs=1e-6)

    # a finished run is not repeated
    stamp = (run / "teacher.safetensors").stat().st_mtime_ns
    assert train_teacher(load_config(config_file), run) == result
    assert (run / "teacher.safetensors").stat().st_mtime_ns == stamp


def test_unfinished_run_resumes_from_its_last_checkpoint(config_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    tiny = ["teacher.depth=1", "teacher.train.epochs=1"]
    train_teacher(load_config(config_file, tiny), run)
    (run / "teacher.json").unlink()  # as if killed after the epoch's checkpoint ...
    before = read_csv(run / "metrics.csv")
    key = next(k for k in before[0] if k != "step")
    with open(run / "metrics.csv", "a", newline="") as fh:  # ... 9 steps into epoch 2
        writer = csv.DictWriter(fh, fieldnames=list(before[0]))
        writer.writerows({"step": 1438 // 32 + i, key: -1} for i in range(9))
        fh.write("-1,")  # a row cut by the kill
    steps = []
    original = TeacherTraining.training_step
    monkeypatch.setattr(
        TeacherTraining, "training_step", lambda self, b, i: steps.append(i) or original(self, b, i)
    )
    result = train_teacher(load_config(config_file, tiny + ["teacher.train.epochs=2"]), run)
    assert len(steps) == 1438 // 32  # only epoch 2 was trained
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # written by this test
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * (1438 // 32)
    assert (run / "teacher.json").is_file()
    rows = read_csv(run / "metrics.csv")  # epoch 1's rows kept, the killed epoch's gone
    assert rows[: len(before)] == before and all(r[key] != "-1" for r in rows)
    assert len(rows) > len(before)
    cfg = load_config(config_file, [*tiny, f"teacher.weights={result['weights']}"])
    assert val_accuracy(Teacher.from_config(cfg.teacher), cfg.data) == pytest.approx(
        result["val_top1"], abs=1e-6
    )


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20) == pytest.approx(1 / 5)
    assert warmup_cosine(3, 4, 20) == pytest.approx(4 / 5)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)


def test_unlabelled_or_headless_teacher_is_refused(config_file, tmp_path):
    from raptor.config import ConfigError

    with pytest.raises(ConfigError, match="num_classes must be > 0"):
        train_teacher(load_config(config_file, ["teacher.num_classes=0"]), tmp_path / "r")
