"""`raptor bench data`: images/s through shard reading, JPEG decoding and the
evaluation transform with W loader workers, for shards of full images and of
stored center crops, made from a synthetic image folder; with `--decode cpu gpu`
also with the JPEGs decoded on the device (`data.decode=gpu`, torchvision's
decode_jpeg; timed to the decoded batch on the device).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from raptor.bench.common import environment, print_pairs, print_table

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_image_folder(
    root: Path, images: int, size: Sequence[int], classes: int, seed: int = 0
) -> None:
    """`classes` class folders holding `images` JPEGs (quality 90) of size (W, H) in all:
    smooth random colour fields plus pixel noise, so files are photo-sized, not tiny."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    W, H = size
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        coarse = rng.integers(0, 256, (H // 32 + 1, W // 32 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((W, H), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"class{i % classes:03d}" / f"img{i:06d}.jpg", quality=90)


def loader_throughput(
    shards: Path,
    workers: int,
    batch_size: int,
    images: int,
    data_config: Dict[str, Any],
    decode: str = "cpu",
) -> Dict[str, Any]:
    """One epoch of `images` through ShardDataModule's training loader with `workers`
    workers and data.decode=`decode`: time to the first batch, and images/s once every
    worker has delivered its first batch (the batches after the first max(W, 1)); a
    batch arrives when its images are ready where they were decoded."""
    from raptor.config import load_config
    from raptor.data.stream import ShardDataModule

    cfg = load_config(
        None,
        [
            f"data.train_urls={shards}",
            f"data.num_workers={workers}",
            f"data.batch_size={batch_size}",
            f"data.train_samples={images}",
            f"data.shuffle_buffer={min(images, 1000)}",
            f"data.decode={decode}",
        ],
    )
    loader = ShardDataModule(cfg.data, data_config).train_dataloader()
    sync = torch.cuda.synchronize if decode == "gpu" and torch.cuda.is_available() else None
    start = time.perf_counter()
    arrivals = []
    for _ in loader:
        if sync is not None:
            sync()
        arrivals.append(time.perf_counter())
    skip = max(1, workers)
    if len(arrivals) <= skip:
        raise SystemExit(
            f"bench data: {len(arrivals)} batches for {workers} workers; raise --images or lower --batch-size"
        )
    steady = (len(arrivals) - skip) * batch_size / (arrivals[-1] - arrivals[skip - 1])
    return {
        "decode": decode,
        "workers": workers,
        "startup_s": arrivals[0] - start,
        "images_per_s": steady,
        "images_per_s_per_worker": steady / skip,
        "epoch_s": arrivals[-1] - start,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from raptor.data.device_decode import DeviceDecoder
    from raptor.data.shards import write_shards

    W, H = (int(v) for v in args.image_size.lower().split("x"))
    side = round(args.input_size / args.crop_pct)
    data_config = {
        "input_size": (3, args.input_size, args.input_size),
        "interpolation": args.interpolation,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": args.crop_pct,
        "crop_mode": "center",
    }
    with tempfile.TemporaryDirectory(prefix="raptor-bench-data-") as tmp:
        work = Path(args.dir) if args.dir else Path(tmp)
        if args.dir and work.exists() and any(work.iterdir()):
            raise SystemExit(f"bench data: --dir {work} is not empty; give an empty or new folder")
        t0 = time.perf_counter()
        synthetic_image_folder(work / "images", args.images, (W, H), args.classes)
        sets = {
            "full images": (work / "full", None),
            f"center crops {side}px": (work / "crops", side),
        }
        for out, crop in sets.values():
            write_shards(
                f"imagefolder:{work / 'images'}",
                out,
                shard_size=max(1, args.images // 8),
                crop=crop,
                progress=False,
            )
        prepare_s = time.perf_counter() - t0
        rows = []
        for name, (out, _) in sets.items():
            for decode in args.decode:
                for workers in args.workers:
                    row = {"shards": name, "kib_per_image": _folder_bytes(out) / args.images / 1024}
                    row.update(
                        loader_throughput(
                            out, workers, args.batch_size, args.images, data_config, decode
                        )
                    )
                    rows.append(row)
    result = {
        "bench": "data",
        "params": {
            "images": args.images,
            "image_size": f"{W}x{H} JPEG q90",
            "classes": args.classes,
            "transform": f"resize {side} ({args.interpolation}) + center crop {args.input_size}, normalize",
            "stored_crop": f"{side}x{side} JPEG q95 (raptor shards --crop {side})",
            "batch_size": args.batch_size,
            "workers": list(args.workers),
            "decode": list(args.decode),
            "gpu decode device": str(DeviceDecoder.device()) if "gpu" in args.decode else None,
            "prepare_s (images + both shard sets)": prepare_s,
        },
        "env": environment(torch.device("cpu")),
        "loaders": rows,
    }
    print_pairs("raptor bench data", result["params"])
    print_table(
        "one epoch through ShardDataModule.train_dataloader (images/s after every worker's first batch)",
        rows,
    )
    return result
