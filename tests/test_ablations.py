"""The ablation switches of the Raptor paper's Table 2: the teacher-forcing weight per
`train.stage1.teacher_forcing`, stage 2 from fresh blocks (`train.stages=[2]`), stage-1
blocks evaluated as one rollout (`train.stages=[1]`, `raptor eval` of stage-1 runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_config, read_csv

from raptor.cli import main as cli_main
from raptor.config import ConfigError, load_config, to_container
from raptor.model.partition import Partition
from raptor.model.raptor import Raptor
from raptor.model.teacher import Teacher
from raptor.train import fit as distill
from raptor.train.schedules import schedule, tf_ratio

ABLATIONS = Path(__file__).parents[1] / "configs" / "ablations"


def test_tf_ratio_per_switch():
    steps = (0, 2, 4, 8, 12)
    assert [tf_ratio(s, 8, "anneal") for s in steps] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert [tf_ratio(s, 8, "always") for s in steps] == [1.0] * 5
    assert [tf_ratio(s, 8, "never") for s in steps] == [0.0] * 5
    assert tf_ratio(3, 0, "always") == 1.0  # the anneal length plays no part
    with pytest.raises(ConfigError, match="teacher_forcing='sometimes'"):
        tf_ratio(0, 8, "sometimes")
    cfg = load_config(None, ["train.stage1.teacher_forcing=never"])
    assert schedule(cfg, 64)["train.stage1.teacher_forcing"] == "never"  # a resume checks it
    with pytest.raises(ConfigError, match="train.stage1.teacher_forcing=nope"):
        load_config(None, ["train.stage1.teacher_forcing=nope"])
    with pytest.raises(ConfigError, match=r"train.stages\[1\]=3"):
        load_config(None, ["train.stages=[1,3]"])


@pytest.mark.parametrize("mode, r, skipped", [("always", 1.0, "ar"), ("never", 0.0, "tf")])
def test_stage1_trains_with_the_fixed_ratio(
    mode, r, skipped, tmp_path, digits_shards, tiny_teacher
):
    cfg = fit_config(
        tiny_teacher,
        digits_shards,
        **{"train.stage1.teacher_forcing": mode, "train.stage1.steps": 3, "train.val_batches": 1},
    )
    out = distill.fit(cfg, tmp_path / "run")
    rows = [row for row in read_csv(Path(out["run_dir"]) / "metrics.csv") if row.get("train/r")]
    assert [float(row["train/r"]) for row in rows] == [r] * 3
    kept = {"ar": "tf", "tf": "ar"}[skipped]
    for row in rows:
        for j in (1, 2):
            assert math.isnan(float(row[f"train/{skipped}_B{j}"]))
            assert float(row[f"train/{kept}_B{j}"]) == pytest.approx(float(row[f"train/loss_B{j}"]))


def test_stage2_without_stage1_starts_from_fresh_blocks(tmp_path, digits_shards, tiny_teacher):
    keys = {"train.stage": 2, "train.stages": "[2]", "train.stage2.steps": 1}
    # one AdamW step of at most ~1e-30 per weight: the checkpoint shows where training started
    keys.update({"train.stage2.lr": 1e-30, "train.stage2.min_lr": 0.0, "train.val_batches": 1})
    keys["train.stage2.weight_decay"] = 0.0
    cfg = fit_config(tiny_teacher, digits_shards, **keys)
    with pytest.warns() as caught:
        out = distill.fit(cfg, tmp_path / "run")
    assert not [w for w in caught if "random init" in str(w.message)]  # chosen, not a slip
    L.seed_everything(int(cfg.train.seed), verbose=False)  # a fresh Raptor, built directly
    teacher = Teacher.from_config(cfg.teacher)
    fresh = Raptor.from_config(cfg.model, teacher, Partition(teacher.num_layers, [2]))
    state = torch.load(out["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    trained = {k[len("raptor.") :]: v for k, v in state.items() if k.startswith("raptor.")}
    assert trained.keys() == fresh.state_dict().keys()
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-20, msg=name)
    with pytest.raises(ConfigError, match="fresh blocks, but train.init_from"):
        distill.build(fit_config(tiny_teacher, digits_shards, **keys, **{"train.init_from": "x"}))
    with pytest.raises(ConfigError, match=r"train.stage=1 is not one of train.stages=\[2\]"):
        distill.build(fit_config(tiny_teacher, digits_shards, **{"train.stages": "[2]"}))


def _write_stage1(run: Path, model: Raptor, cfg, blocks) -> None:
    ckpt = {
        "state_dict": {f"raptor.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "config": to_container(cfg),
            "arch": model.arch_config(),
            "stage": 1,
            "blocks": blocks,
        },
        "global_step": 3,
    }
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")


def test_stage1_runs_are_evaluated_as_one_rollout(tmp_path, digits_shards, tiny_teacher):
    """`raptor eval` of a stage-1 run with every block, and of stage-1 runs of one block
    each joined by commas, equals a direct rollout of those blocks from a_0."""
    from raptor.data.stream import ShardDataModule

    cfg = fit_config(tiny_teacher, digits_shards, **{"data.batch_size": 64})
    teacher = Teacher.from_config(cfg.teacher)
    torch.manual_seed(3)
    model = Raptor.from_config(cfg.model, teacher, Partition(teacher.num_layers, [2]))
    with torch.no_grad():  # far from the near-identity init
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 0.6)
    model.eval()
    _write_stage1(tmp_path / "k2" / "stage1", model, cfg, [1, 2])
    _write_stage1(tmp_path / "b1", model, cfg, [1])
    _write_stage1(tmp_path / "b2", model, cfg, [2])
    assert cli_main(["eval", str(tmp_path / "k2" / "stage1")]) == 0
    joined = f"{tmp_path / 'b1'},{tmp_path / 'b2'}"
    assert cli_main(["eval", joined, f"run_dir={tmp_path / 'joined'}"]) == 0
    whole = json.loads((tmp_path / "k2" / "stage1" / "eval" / "eval.json").read_text())
    parts = json.loads((tmp_path / "joined" / "eval.json").read_text())
    assert whole["stage"] == 1 and whole["student"] == parts["student"]
    assert whole["top1"] == parts["top1"]

    preds, targets, hits, n = [], [], 0, 0
    dm = ShardDataModule(cfg.data, teacher.data_config, teacher.num_classes)
    with torch.no_grad():
        for batch in dm.val_dataloader():
            keep = batch["valid"]
            traj = teacher.trajectory(batch["image"][keep])
            a, states = traj[:, 0], []
            for layer in range(1, teacher.num_layers + 1):  # block 1 for layers 1-2, 2 for 3-4
                a = model.blocks[0 if layer <= 2 else 1](a, layer)
                states.append(a)
            preds.append(torch.stack(states, 1).double())
            targets.append(traj[:, 1:].double())
            logits = teacher.finish(states[-1], teacher.num_layers)["logits"]
            hits += int((logits.argmax(-1) == batch["label"][keep]).sum())
            n += int(keep.sum())
    p, y = torch.cat(preds), torch.cat(targets)
    for i in range(teacher.num_layers):
        pi, yi = p[:, i].flatten(0, 1), y[:, i].flatten(0, 1)
        r2 = 1 - ((pi - yi) ** 2).sum() / ((yi - yi.mean(0)) ** 2).sum()
        assert whole["student"]["r2"]["all"][i] == pytest.approx(r2.item(), abs=1e-5)
    assert whole["images"] == n and whole["top1"]["student"] == pytest.approx(hits / n)


@pytest.mark.parametrize(
    "stages, names, evaluated",
    [
        ([1, 2], ["k3/stage1", "k3/stage2"], "k3/stage2"),
        ([1], ["k3/stage1"], "k3/stage1"),
        ([2], ["k3/stage2"], "k3/stage2"),
    ],
)
def test_pipeline_steps_follow_train_stages(stages, names, evaluated, tmp_path):
    from raptor.pipeline import pipeline_steps

    cfg = load_config(ABLATIONS / "table2_5_connect.yaml", [f"train.stages={stages}"])
    steps = {s.name: s for s in pipeline_steps(cfg, tmp_path)}
    assert [n for n in steps if "/stage" in n] == names
    assert evaluated in steps["k3/eval"].after and evaluated in steps["k3/export"].after
    if stages == [2]:  # fresh blocks: nothing from a stage 1
        assert not any("stage1" in a for a in steps["k3/stage2"].after)


def test_ablation_configs_are_the_ladder():
    rungs = sorted(ABLATIONS.glob("table2_*.yaml"))
    got = []
    for f in rungs:
        c = load_config(f)
        s1 = c.train.stage1
        got.append((s1.teacher_forcing, c.model.depth_conditioning, s1.loss, list(c.train.stages)))
    assert got == [
        ("always", False, "mse", [1]),
        ("anneal", False, "mse", [1]),
        ("anneal", True, "mse", [1]),
        ("anneal", True, "weighted_final", [1]),
        ("anneal", True, "weighted_final", [1, 2]),
    ]
    assert load_config(ABLATIONS / "ar_only.yaml").train.stage1.teacher_forcing == "never"
    assert list(load_config(ABLATIONS / "stage2_only.yaml").train.stages) == [2]
