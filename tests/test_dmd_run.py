"""`raptor dmd` end to end on real digits shards with a small random ViT teacher."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch

from dmd import MomentAccumulator, fit, trajectory_metrics
from raptor.cli import main as cli_main
from raptor.config import ConfigError, load_config
from raptor.eval.dmd_baselines import REPORT_FILE, run_dmd


def _cfg(shards, run_dir, *extra):
    return load_config(
        "configs/demo.yaml",
        [
            f"run_dir={run_dir}",
            f"data.shards_dir={shards}",
            "data.batch_size=16",
            "teacher.train_from_scratch=false",
            "teacher.init=random",
            "teacher.depth=4",
            "teacher.embed_dim=32",
            "teacher.drop_path_rate=0.0",
            "logging.wandb=disabled",
            "dmd.calib_images=60",
            "dmd.eval_images=40",
            "dmd.solvers=[ridge,rrr]",
            "dmd.rank=8",
            "dmd.alpha=1e-3",
            "phases.boundaries=[2]",
            "dmd.sweep.ranks=[4,16]",
            "dmd.sweep.alphas=[1e-6,1e-1]",
            "dmd.sweep.budgets=[15,30,60]",
            "dmd.sweep.cut_starts=[0,1]",
            "dmd.sweep.prune_lengths=[1,3]",
            "dmd.sweep.token_groups=[cls,patch]",
            "dmd.compute_dtype=float64",  # compared below with float64 moments to 1e-6
            *extra,
        ],
    )


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_raptor_dmd_writes_report_tables_and_plots(digits_shards, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(digits_shards, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_dmd(cfg)
    run = tmp_path / "run"
    stored = json.loads((run / REPORT_FILE).read_text())
    assert stored["calib_images"] == 60 and stored["eval_images"] == 40
    assert stored["spans"] == [[0, 2], [2, 2]]  # the phases of phases.boundaries=[2]
    names = set(report["variants"])
    assert {"span_rrr@0,2", "anchor_ridge@2,2", "endpoint_rrr@0,2", "identity@2,2"} <= names

    # independent recomputation: the same first 60 training and 40 validation images
    from raptor.data.stream import ShardDataModule
    from raptor.model.teacher import Teacher

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = Teacher.from_config(cfg.teacher)
    dm = ShardDataModule(cfg.data, teacher.data_config)
    # one pass, three accumulators: all 60 images; the first 15 (budget sweep); cls rows only
    acc = MomentAccumulator(4, 32, endpoints=[(0, 2), (2, 4)])
    first15 = MomentAccumulator(4, 32)
    cls_rows = MomentAccumulator(4, 32, tokens=teacher.groups["cls"])
    for batch in dm.train_dataloader():
        traj = teacher.trajectory(batch["image"])
        count = torch.cumsum(batch["valid"], 0) + acc.images
        acc.update(traj, batch["valid"] & (count <= 60))
        first15.update(traj, batch["valid"] & (count <= 15))
        cls_rows.update(traj, batch["valid"] & (count <= 60))
        if acc.images >= 60:
            break
    assert (acc.images, first15.images, cls_rows.images) == (60, 15, 60)
    trajs, labels = [], []
    for batch in dm.val_dataloader():
        trajs.append(teacher.trajectory(batch["image"])[batch["valid"]])
        labels.append(batch["label"][batch["valid"]])
    traj, labels = torch.cat(trajs)[:40], torch.cat(labels)[:40]

    def metrics(op):
        return trajectory_metrics(
            op.predict(traj[:, 0], 2).transpose(1, 2), traj[:, 1:3], teacher.groups
        )

    op = fit(acc, (0, 2), "span", "rrr", rank=8, alpha=1e-3)
    want = metrics(op)
    got = report["variants"]["span_rrr@0,2"]["fidelity"]
    for key in ("r2/all", "cos/patch", "rel_l2/cls"):
        assert got[key] == pytest.approx(want[key].tolist(), rel=1e-4), key
    lam = torch.sort(op.eigenvalues().abs(), descending=True).values
    eig = [
        r
        for r in _rows(run / "dmd_eigenvalues.csv")
        if r["variant"] == "span_rrr" and r["i"] == "0"
    ]
    assert len(eig) == 8
    assert [float(r["abs"]) for r in eig] == pytest.approx(lam.tolist(), rel=1e-6)

    # the budget and token-group sweeps: the base fit on the first 15 images / the cls rows,
    # scored at the span end (layer 2) on all tokens / on cls
    sweeps = report["sweeps"]
    (b15,) = [r for r in sweeps["budget"] if r["value"] == 15]
    (cls,) = [r for r in sweeps["token_group"] if r["group"] == "cls"]
    for row, fitted, group in ((b15, first15, "all"), (cls, cls_rows, "cls")):
        ref = metrics(fit(fitted, (0, 2), "span", "rrr", rank=8, alpha=1e-3))
        for m in ("r2", "cos", "rel_l2"):
            assert row[m] == pytest.approx(float(ref[f"{m}/{group}"][1]), rel=1e-4), (row, m)

    # downstream: the span-end prediction finished by the teacher's blocks and head; top-1
    # against the labels and agreement with the teacher's own top-1, recomputed here
    down = {(r["variant"], r["i"], r["group"]): r for r in _rows(run / "dmd_downstream.csv")}
    own = teacher.finish(traj[:, 4], 4)["logits"].argmax(-1)
    for variant, i, end in (
        ("identity", "2", traj[:, 2]),
        ("span_rrr", "0", op.predict(traj[:, 0], 2)[..., -1, :]),
    ):
        layer = int(i) + 2
        top = teacher.finish(end.float(), layer)["logits"].argmax(-1)
        row = down[(variant, i, "all")]
        assert float(row["top1"]) == pytest.approx(float((top == labels).double().mean()))
        assert float(row["agree"]) == pytest.approx(float((top == own).double().mean()))

    # sweeps: one table each, the budget power law fitted
    assert len(sweeps["rank"]) == 2 and len(sweeps["alpha"]) == 4 and len(sweeps["budget"]) == 3
    # every selection at each cut start, but ReplaceMe only where a block precedes the cut
    assert len(sweeps["cut_start"]) == 4 + 5 and len(sweeps["prune_length"]) == 2 * 4
    assert [r["value"] for r in sweeps["cut_start"] if r["selection"] == "replaceme"] == [1]
    assert [r["group"] for r in sweeps["token_group"]] == ["cls", "patch"]
    # the power law rel_l2(B) = C / B^gamma: a straight line through the rows in log-log
    rows = sweeps["budget"]
    slope, _ = np.polyfit(
        np.log([r["value"] for r in rows]), np.log([r["rel_l2"] for r in rows]), 1
    )
    assert report["budget_fit"]["gamma"] == pytest.approx(-slope, rel=1e-9)
    for name in ("rank", "alpha", "budget", "cut_start", "prune_length", "token_group"):
        assert (run / f"dmd_sweep_{name}.csv").exists() and (run / f"dmd_sweep_{name}.png").exists()
    for png in ("dmd_eigenvalues", "dmd_budget", "dmd_q_cos_i0_p2", "dmd_q_r2_i2_p2"):
        assert (run / f"{png}.png").stat().st_size > 1000

    # the report is not replaced without --overwrite
    with pytest.raises(ConfigError, match="--overwrite"):
        run_dmd(cfg)


def test_bad_dmd_settings_fail_before_any_image(digits_shards, tmp_path, capsys):
    rc = cli_main(
        [
            "dmd",
            "configs/demo.yaml",
            f"run_dir={tmp_path}",
            f"data.shards_dir={digits_shards}",
            "teacher.train_from_scratch=false",
            "dmd.solvers=[ridge,svd]",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "dmd.solvers[1]=svd is not a valid choice: expected one of ridge, pcr, rrr" in err
    )
    cfg = _cfg(digits_shards, tmp_path / "r2", "dmd.sweep.cut_starts=[3]")
    with pytest.raises(ConfigError, match=r"dmd.sweep.cut_starts=3 around the base span \(0, 2\)"):
        run_dmd(cfg)
    cfg = _cfg(digits_shards, tmp_path / "r3", "dmd.update_memory_mib=0.001")
    with pytest.raises(ConfigError, match=r"dmd.update_memory_mib=0.001: .* at width 32 in torch"):
        run_dmd(cfg)
