"""`raptor analyze` end to end on the tiny teacher and a Raptor checkpoint: its numbers
against a direct computation on the same images, its files, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from raptor.cli import main as cli_main
from raptor.model.teacher import Teacher
from tests.conftest import fit_config, fit_overrides, read_csv, write_raptor

IMAGES = 24


def test_analyze_equals_a_direct_computation_on_the_same_images(
    tmp_path, tiny_teacher, digits_shards, capsys
):
    extra = {"data.batch_size": 64, "analyze.images": IMAGES, "analyze.epsilon": 0.1}
    cfg = fit_config(tiny_teacher, digits_shards, **extra)
    teacher = Teacher.from_config(cfg.teacher).eval()
    raptor = write_raptor(tmp_path / "k2" / "stage2", cfg, teacher)
    (tmp_path / "c.yaml").write_text("name: tiny\n")
    out = tmp_path / "analysis"
    args = ["analyze", str(tmp_path / "c.yaml"), f"model={tmp_path / 'k2' / 'stage2'}"]
    args += fit_overrides(tiny_teacher, digits_shards, **extra, run_dir=str(out))
    assert cli_main(args) == 0
    assert "raptor analyze: teacher, k2 on 24 images" in capsys.readouterr().out
    res = json.loads((out / "analysis.json").read_text())
    assert [m["name"] for m in res["models"]] == ["teacher", "k2"] and res["images"] == IMAGES
    assert res["models"][1]["boundaries"] == [2]

    from raptor.data.stream import ShardDataModule

    batch = next(iter(ShardDataModule(cfg.data, teacher.data_config, 10).val_dataloader()))
    assert bool(batch["valid"][:IMAGES].all())
    images = batch["image"][:IMAGES]
    with torch.no_grad():
        t = teacher.trajectory(images).double()
        a0 = teacher.embed(images)
        r = torch.cat([a0[:, None], raptor(a0)], 1).double()
    L = teacher.num_layers

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    gamma_cls = (unit(t[:, :, 0]) * unit(t[:, -1:, 0])).sum(-1).mean(0)
    assert res["stats"]["teacher"]["gamma"]["cls"]["mean"] == pytest.approx(
        gamma_cls.tolist(), abs=1e-5
    )
    cos = (unit(r[:, 1:, 3:]) * unit(r[:, :-1, 3:])).sum(-1).clamp(-1, 1)  # patch tokens
    speed = torch.arccos(cos).mean((0, 2))
    assert res["stats"]["k2"]["speed"]["patch"]["mean"] == pytest.approx(speed.tolist(), abs=1e-4)
    # the perturbation goes into the Raptor's own rollout, with the seeded noise
    noise = torch.randn(r.shape, generator=torch.Generator().manual_seed(0))
    sens = []
    with torch.no_grad():
        for layer in range(L + 1):
            x = r[:, layer].float() + 0.1 * noise[:, layer]
            for nxt in range(layer + 1, L + 1):
                x = raptor.step(x, nxt)
            d = 1 - (unit(x.double()) * unit(r[:, L])).sum(-1)
            sens.append(float(d[:, 3:].mean()) / 0.1)
    assert res["stats"]["k2"]["sensitivity"]["patch"]["mean"] == pytest.approx(sens, rel=1e-3)

    rows = read_csv(out / "gamma.csv")
    assert {r["model"] for r in rows} == {"teacher", "k2"} and len(rows) == 2 * 4 * (L + 1)
    lam = read_csv(out / "dmd_eigenvalues.csv")
    assert lam and all(float(x["radius"]) >= 0 for x in lam)
    for name in res["plots"]:
        assert (out / f"{name}.png").stat().st_size > 0
    md = (out / "analysis.md").read_text()
    assert "largest gap to teacher: k2" in md and "![angular_speed](angular_speed.png)" in md


def test_wrong_input_gives_one_line_errors(tmp_path, tiny_teacher, digits_shards, capsys):
    (tmp_path / "c.yaml").write_text("name: tiny\n")
    base = ["analyze", str(tmp_path / "c.yaml")]
    base += fit_overrides(tiny_teacher, digits_shards, run_dir=str(tmp_path / "out"))
    cases = [
        (["model=/no/such/run"], "model=/no/such/run: no such run folder, checkpoint or export"),
        (["model="], "model= needs a value"),
        (["analyze.epsilon=0"], "analyze.epsilon"),
        (["analyze.dmd_rank=0"], "analyze.dmd_rank"),
    ]
    for extra, message in cases:
        assert cli_main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
