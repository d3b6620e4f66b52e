"""`raptor.train.checkpoints.load_raptor`: one loader for evaluation and export, on
checkpoints written in the `raptor fit` layout (single runs and joined stage-1 runs)."""

from __future__ import annotations

import pytest
import torch

from raptor.config import ConfigError
from raptor.model.raptor import Raptor
from raptor.train.checkpoints import load_raptor


class OwnError(ConfigError):
    pass


def save_run(folder, model, stage, blocks):
    """A run folder with checkpoints/last.ckpt as `raptor fit` writes it (the parts read)."""
    path = folder / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    hparams = {"config": {}, "arch": model.arch_config(), "stage": stage, "blocks": blocks}
    state = {f"raptor.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state, "global_step": 1}, path)
    return folder


def models(n):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(Raptor(4, [2], 8, 2, mlp="gelu", mlp_ratio=1.0))
    return out


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.values(), b.values())) and a.keys() == b.keys()


def test_a_whole_run_and_joined_stage1_runs(tmp_path):
    a, b = models(2)
    whole = save_run(tmp_path / "s2", a, 2, [1, 2])
    got, ckpts, paths = load_raptor(whole)
    assert same(got.state_dict(), a.state_dict())
    assert (
        paths == [whole / "checkpoints" / "last.ckpt"]
        and ckpts[0]["hyper_parameters"]["stage"] == 2
    )
    assert load_raptor(paths[0])[2] == paths  # a .ckpt file as well as its run folder
    # block 1 from run a, block 2 from run b
    one = save_run(tmp_path / "b1", a, 1, [1])
    two = save_run(tmp_path / "b2", b, 1, [2])
    joined, _, paths = load_raptor(f"{one}, {two}")
    assert len(paths) == 2
    assert same(joined.blocks[0].state_dict(), a.blocks[0].state_dict())
    assert same(joined.blocks[1].state_dict(), b.blocks[1].state_dict())


def test_partial_or_mismatched_sources_are_refused(tmp_path):
    a, b = models(2)
    one = save_run(tmp_path / "b1", a, 1, [1])
    with pytest.raises(OwnError, match=r"trained block\(s\) \[1\] of 2; the others are untrained"):
        load_raptor(one, OwnError)
    whole = save_run(tmp_path / "s2", b, 2, [1, 2])
    with pytest.raises(ConfigError, match="joined only for stage-1 runs"):
        load_raptor(f"{one},{whole}")
    with pytest.raises(ConfigError, match="no run folder or checkpoint given"):
        load_raptor(" , ")
    broken = tmp_path / "broken" / "last.ckpt"
    broken.parent.mkdir()
    ckpt = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["state_dict"].pop(next(k for k in ckpt["state_dict"] if k.startswith("raptor.blocks.1")))
    torch.save(ckpt, broken)
    with pytest.raises(ConfigError, match="do not fit its stored architecture"):
        load_raptor(broken)
