"""raptor.distributed beyond the launchers' variables (tests/test_preemption.py has those):
the Trainer's view, the planned world size of a config, the device of a process."""

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from raptor import distributed


def test_a_trainer_knows_better_than_the_environment(monkeypatch):
    """A single-process Trainer inside a shell whose environment names other ranks (an
    salloc shell, a torchrun leftover) is rank 0 of 1; without it the environment counts."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert distributed.rank_and_world(trainer) == (0, 1)
    assert distributed.rank_and_world() == (3, 4)


@pytest.mark.parametrize(
    "devices, nodes, want",
    [(2, 1, 2), ("3", 2, 6), ([0, 1, 2], 2, 6), (OmegaConf.create({"d": [4, 5]}).d, 3, 6)],
)
def test_planned_world_size(devices, nodes, want):
    assert distributed.planned_world_size(devices, nodes) == want


def test_auto_devices_count_the_gpus_here():
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert distributed.planned_world_size("auto", 2) == 2 * gpus


def test_device_follows_the_accelerator_and_the_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.device("cpu") == torch.device("cpu")
    assert distributed.uses_gpu("cpu") is False
    if torch.cuda.is_available():
        assert distributed.device("auto") == torch.device("cuda", 1)
    else:
        assert distributed.device("auto") == distributed.device("gpu") == torch.device("cpu")
