"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """Folder of digits shards written once per session by `raptor.data.shards.write_shards`:
    shard size 256, val fraction 0.2, seed 0 -> train 1438 samples in 6 shards (5 x 256 +
    158), val 359 in 2 (256 + 103), 8x8 grayscale PNGs, labels 0..9, manifest.json."""
    from raptor.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits_shards")
    write_shards("digits", out, shard_size=256, val_fraction=0.2, seed=0, progress=False)
    return out


@pytest.fixture(autouse=True)
def _isolate_process_state():
    """Commands run in-process change process-wide state: torch's thread count
    (`trainer.num_threads`) and environment variables (Lightning's PL_GLOBAL_SEED /
    PL_SEED_WORKERS, which subprocesses inherit). Restore both after every test so a
    test's settings cannot change the numerics of the tests after it."""
    import os

    import torch

    threads, env = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)


def read_csv(path) -> list[dict]:
    """The rows of a CSV file (a run's metrics.csv, a DMD table) as dicts."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- tiny models

# Steps of each stage in the tiny distillation runs (`fit_overrides`).
STAGE1_STEPS, STAGE2_STEPS = 40, 40


def make_vit(seed: int = 0, name: str = "vit_tiny_patch16_224", **arch):
    """A random timm ViT built after torch.manual_seed(seed): timm's `name` shrunk by `arch`
    (img_size, patch_size, embed_dim, depth, ...), in train mode as timm returns it."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(name, **arch)


def write_tiny_teacher(path):
    """The distillation tests' teacher as a `raptor teacher` safetensors file: depth 4,
    width 32, 16 px images in 4 px patches, 2 registers, 10 classes, its residual branches
    scaled up so each block moves the tokens visibly (the identity map a_L ~ a_0 has
    R^2 < 0 at the last layer)."""
    import torch

    from raptor.model.teacher import Teacher

    vit = make_vit(
        img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, reg_tokens=2, num_classes=10
    )
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(10**0.5)
            blk.attn.proj.weight.mul_(10.0)
            blk.mlp.fc2.weight.mul_(10.0)
    return Teacher(vit).save(path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """`write_tiny_teacher`'s file, written once per session (tests only read it)."""
    return write_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher") / "teacher.safetensors")


def fit_overrides(teacher, shards, **extra) -> list[str]:
    """`raptor fit` overrides for a tiny CPU run of `teacher` on `shards`: k=2 with phases
    1-2 and 3-4, STAGE1_STEPS / STAGE2_STEPS steps, validation on 4 batches every 20 steps,
    a checkpoint every 10, no DMD, a metrics row every step; `extra` adds or replaces keys."""
    base = {
        "teacher.weights": str(teacher),
        "model.k": 2,
        "phases.boundaries": "[2]",
        "data.shards_dir": str(shards),
        "data.num_workers": 0,
        "data.batch_size": 16,
        "data.shuffle_buffer": 64,
        "train.val_batches": 4,
        "train.val_every_n_steps": 20,
        "train.ckpt_every_n_steps": 10,
        "train.stage1.steps": STAGE1_STEPS,
        "train.stage1.warmup_steps": 2,
        "train.stage1.lr": 3e-3,
        "train.stage2.steps": STAGE2_STEPS,
        "train.stage2.warmup_steps": 2,
        "train.stage2.lr": 3e-3,
        "dmd.enabled": False,
        "logging.progress_bar": False,
        "logging.log_every_n_steps": 1,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def fit_config(teacher, shards, **extra):
    """The config `fit_overrides` gives."""
    from raptor.config import load_config

    return load_config(None, fit_overrides(teacher, shards, **extra))


def write_raptor(run, cfg, teacher):
    """A stage-2 checkpoint of a k=2 Raptor (boundary 2) with blocks far from the identity,
    in the run folder `run`; returns the Raptor in eval mode."""
    import torch
    from omegaconf import OmegaConf

    from raptor.model.partition import Partition
    from raptor.model.raptor import Raptor

    torch.manual_seed(5)
    model = Raptor.from_config(cfg.model, teacher, Partition(teacher.num_layers, [2]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 0.6)
    ckpt = {
        "state_dict": {f"raptor.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "config": OmegaConf.to_container(cfg),
            "arch": model.arch_config(),
            "stage": 2,
        },
        "global_step": 1,
    }
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    return model.eval()


def demo_overrides(run_dir: Path, shards: Path) -> list[str]:
    """The demo config (`DEMO`) shrunk to seconds: a 4-layer teacher (2 epochs of 512
    images), k=2 only, a few steps, one probe epoch, 32 analysed images."""
    return [
        f"run_dir={run_dir}",
        f"data.shards_dir={shards}",
        "teacher.depth=4",
        "teacher.embed_dim=32",
        "teacher.num_heads=2",
        "teacher.train.epochs=2",
        "data.train_samples=512",
        "phases.ks=[2]",
        "phases.num_images=64",
        "pipeline.ks=[2]",
        "train.stage1.steps=6",
        "train.stage2.steps=6",
        "train.stage1.warmup_steps=1",
        "train.stage2.warmup_steps=1",
        "train.val_every_n_steps=6",
        "train.ckpt_every_n_steps=6",
        "train.val_batches=2",
        "dmd.calib_images=64",
        "dmd.rank=8",
        "probe.epochs=1",
        "analyze.images=32",
        "logging.progress_bar=false",
    ]


@pytest.fixture(scope="session")
def demo_pipeline(tmp_path_factory):
    """One `raptor pipeline DEMO` with `demo_overrides`, stage 2 all but frozen (6 AdamW
    steps at lr 1e-9: its weights show where it started) and W&B offline, shared by the
    tests that read it (a rerun of it skips every step): (run folder, argv, its stdout)."""
    import torch

    from raptor.cli import main as cli_main

    root = tmp_path_factory.mktemp("demo_pipeline")
    run = root / "run"
    args = ["pipeline", str(DEMO), *demo_overrides(run, root / "shards")]
    args += ["train.stage2.lr=1e-9", "train.stage2.min_lr=0", "logging.wandb=offline"]
    threads, env = torch.get_num_threads(), dict(os.environ)  # as _isolate_process_state
    os.environ["WANDB_SILENT"] = "true"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert cli_main(args) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(env)
    return run, args, out.getvalue()
