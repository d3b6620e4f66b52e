"""The one-shot GPU suite (`make bench-gpu`) in its CPU dry-run mode, and data.decode=gpu
(decode_jpeg + the transform in the main process; on the CPU here) against CPU decoding."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from raptor.bench import gpu


def make_recipe(*variables: str) -> list:
    """The command `make bench-gpu` runs (make -n; the venv stamp taken as up to date)."""
    out = subprocess.run(  # --no-print-directory: under `make test`, make[1] names its folder
        ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "bench-gpu", *variables],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    return shlex.split(out.splitlines()[-1])


def test_make_bench_gpu_dry_run_writes_json_and_table(tmp_path):
    argv = make_recipe("BENCH_GPU_FLAGS=--dry-run", f"BENCH_GPU_OUT={tmp_path}")
    assert argv[:3] == [".venv/bin/python", "-m", "raptor.bench.gpu"]
    assert gpu.main(argv[3:]) == 0
    suite = json.loads((tmp_path / "bench_gpu.json").read_text())
    table = (tmp_path / "bench_gpu.md").read_text()
    sections = suite["sections"]
    assert list(sections) == ["stage2", "stage2_compile", "stage1", "dmd", "data"]
    assert all(s["status"] == "ok" for s in sections.values()), sections
    s2, compiled = sections["stage2"]["figures"], sections["stage2_compile"]["figures"]
    assert s2["params"]["stage"] == 2 and compiled["params"]["compile"] == "eager"
    assert sections["stage1"]["figures"]["params"]["stage"] == 1
    rows = {r["figure"]: r for r in suite["summary"]}
    base = s2["baseline"]
    assert rows["stage 2 / reference-style baseline"]["value"] == pytest.approx(
        base["images_per_s_this"] / base["images_per_s_baseline"]
    )
    assert rows["torch.compile on / off"]["value"] == pytest.approx(
        compiled["result"]["images_per_s"] / s2["result"]["images_per_s"]
    )
    assert rows["DMD moments pass / teacher forward"]["value"] == s2["dmd_pass"]["ratio"]
    assert rows["largest stage-2 batch"]["note"] == "not run"  # needs CUDA
    loaders = sections["data"]["figures"]["loaders"]
    assert sorted({r["decode"] for r in loaders}) == ["cpu", "gpu"]
    for figure, row in rows.items():  # every headline row is in the table
        assert f"| {figure} | {gpu._cell(row['value'])} |" in table


def test_bench_gpu_stops_starting_sections_when_its_budget_is_spent(tmp_path):
    suite = gpu.run_suite(True, tmp_path, budget_s=0.0)
    assert all(s["status"] == "skipped: time budget 0 s spent" for s in suite["sections"].values())
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["sections"] == suite["sections"]


def jpeg_shards(root):
    from raptor.bench.data import synthetic_image_folder
    from raptor.data.shards import write_shards

    synthetic_image_folder(root / "images", 12, (40, 30), classes=3, seed=1)
    write_shards(f"imagefolder:{root / 'images'}", root / "shards", shard_size=6, progress=False)
    return root / "shards"


def loader_batches(shards, decode: str):
    from raptor.bench.data import IMAGENET_MEAN, IMAGENET_STD
    from raptor.config import load_config
    from raptor.data.stream import ShardDataModule

    cfg = load_config(
        None,
        [
            f"data.train_urls={shards}",
            "data.num_workers=0",
            "data.batch_size=4",
            "data.train_samples=12",
            f"data.decode={decode}",
        ],
    )
    data_config = {
        "input_size": (3, 24, 24),
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    return list(ShardDataModule(cfg.data, data_config).train_dataloader())


def test_gpu_decoding_gives_the_cpu_pipelines_images(tmp_path):
    shards = jpeg_shards(tmp_path)
    cpu, dev = loader_batches(shards, "cpu"), loader_batches(shards, "gpu")
    assert len(cpu) == len(dev) == 3
    for a, b in zip(cpu, dev):
        assert torch.equal(a["label"], b["label"]) and bool(b["valid"].all())
        assert b["image"].shape == a["image"].shape == (4, 3, 24, 24)
        assert b["image"].dtype == torch.float32
        # libjpeg + torchvision's antialiased bicubic vs PIL's: close, not bit-equal
        # (normalized units; 0.05 is about 3 grey levels of 255)
        diff = (a["image"] - b["image"]).abs()
        assert diff.mean() < 0.05 and diff.max() < 0.5


def test_gpu_decoding_skips_a_non_jpeg_as_a_bad_sample():
    from raptor.data.device_decode import EncodedJpeg
    from raptor.data.stream import _Bad, decode_sample

    with pytest.raises(_Bad, match="not a JPEG"):
        decode_sample({"png": b"\x89PNG\r\n\x1a\n" + bytes(20)}, EncodedJpeg(), False)
    data = b"\xff\xd8\xff" + bytes(10)
    image, label = decode_sample({"jpg": data, "cls": b"2"}, EncodedJpeg(), True)
    assert label == 2 and bytes(image.numpy()) == data
