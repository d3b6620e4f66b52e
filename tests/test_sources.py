"""`raptor.eval.sources`: `raptor probe` and `raptor analyze` read a Raptor the same way:
the same weights and trajectory, the same names for repeated sources, the same errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from raptor.errors import UserError
from raptor.eval.dynamics.run import load_models
from raptor.eval.probe.run import probe_models
from raptor.eval.sources import label, load_source, raptor_trajectory, unique_names
from raptor.model.teacher import Teacher
from tests.conftest import fit_config, make_vit, write_raptor


@pytest.fixture
def setup(tmp_path, tiny_teacher, digits_shards):
    cfg = fit_config(tiny_teacher, digits_shards)
    teacher = Teacher.from_config(cfg.teacher).eval()
    run = tmp_path / "runs" / "k2" / "stage2"
    return cfg, teacher, run, write_raptor(run, cfg, teacher)


def test_a_run_folder_loads_its_weights_and_rolls_out_from_the_teachers_a0(setup):
    cfg, teacher, run, raptor = setup
    src = load_source(run, teacher, "model=X")
    assert (src.name, src.kind, src.paths) == ("k2", "raptor", [run / "checkpoints/last.ckpt"])
    for (n, a), (m, b) in zip(src.raptor.state_dict().items(), raptor.state_dict().items()):
        assert n == m and torch.equal(a, b)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = teacher.embed(images)
        want = [a]
        for layer in range(1, teacher.num_layers + 1):
            a = raptor.step(a, layer)
            want.append(a)
    assert torch.allclose(raptor_trajectory(src, teacher, images), torch.stack(want, 1), atol=1e-6)


def test_probe_and_analyze_name_repeated_sources_alike(setup):
    cfg, teacher, run, _ = setup
    specs = ["teacher", str(run), str(run)]
    cfg = OmegaConf.merge(cfg, {"probe": {"models": specs}})
    probe = [m.name for m in probe_models(cfg, teacher, run.parent.parent)]
    analyze = [m.name for m in load_models(specs, teacher)]
    assert probe == analyze == ["teacher", "k2", "k2 #2"]
    assert unique_names(["a", "b", "a", "a"]) == ["a", "b", "a #2", "a #3"]
    assert label("/x/k3/stage1,/x/k3/stage1b") == "k3"
    assert label("/x/exports/k4/export") == "k4 export" and label("/x/mine") == "mine"


def test_wrong_sources_are_one_line_errors_naming_the_option(setup, tmp_path):
    cfg, teacher, run, _ = setup
    with pytest.raises(UserError, match=r"^model=/no/run: no such run folder, checkpoint or"):
        load_models(["/no/run"], teacher)
    cfg = OmegaConf.merge(cfg, {"probe": {"models": ["teachr"]}})
    with pytest.raises(UserError, match=r"^probe.models: teachr: no such .* teacher, raptors"):
        probe_models(cfg, teacher, tmp_path)
    deeper = Teacher(make_vit(img_size=16, patch_size=4, embed_dim=32, depth=6, num_heads=2))
    for what in ("model=R", "probe.models: R"):
        with pytest.raises(UserError, match=rf"^{what}: a Raptor of 4 layers .* teacher has 6"):
            load_source(run, deeper, what)
