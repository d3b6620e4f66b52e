"""`raptor bench train|dmd|data`: parse the action's options, run it, print (and --json).

The actions live in `raptor.bench` (one module each)."""

from __future__ import annotations

import argparse

import torch

from raptor.bench import data, dmd, growth, train
from raptor.bench.common import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (_, options, help, device) in ACTIONS.items():
        p = sub.add_parser(name, help=help)
        options(p)
        _add_common(p, device)


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The options every action takes: --device/--matmul-precision (not `data`), --threads, --json."""
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        p.add_argument(
            "--matmul-precision",
            choices=["highest", "high", "medium"],
            help="torch.set_float32_matmul_precision (high/medium let float32 matmuls use TF32)",
        )
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's). On a CPU shared with other jobs use 1: "
        "OpenMP threads waiting on a busy core can make small ops many times slower",
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def main(args: argparse.Namespace) -> int:
    module = ACTIONS[args.action][0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "matmul_precision", None):
        torch.set_float32_matmul_precision(args.matmul_precision)
    result = module.run(args)
    write_json(args.json, result)
    return 0


def _train_options(parser: argparse.ArgumentParser) -> None:
    """The options of `bench train`: CONFIG [k=v ...] and what to time."""
    from raptor.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument(
        "--stage", type=int, choices=[1, 2], help="default: the config's train.stage"
    )
    parser.add_argument("--batch-size", type=int, help="images per step (default: data.batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument(
        "--precision", help="Lightning precision (default: bf16-mixed on GPU, 32-true on CPU)"
    )
    parser.add_argument(
        "--attn-backend",
        choices=["auto", *train.ATTN_BACKENDS],
        default="auto",
        help="scaled_dot_product_attention backend (torch.nn.attention.sdpa_kernel)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every teacher and surrogate block"
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (default inductor)"
    )
    parser.add_argument(
        "--baseline-rounds",
        type=int,
        default=3,
        help="rounds of (this run, reference-style baseline), interleaved; medians (default 3)",
    )
    parser.add_argument(
        "--baseline-batch", type=int, help="the baseline's batch (default: the run's batch)"
    )
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="skip the reference-style baseline (float32, explicit softmax attention)",
    )
    parser.add_argument(
        "--max-batch-limit",
        type=int,
        default=4096,
        help="--max-batch never tries a batch above this (default 4096)",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute surrogate block activations in the backward pass",
    )
    parser.add_argument(
        "--max-batch",
        action="store_true",
        help="CUDA: first find the largest batch that fits (doubling from the batch size, "
        "then bisection to a multiple of 8) and bench that",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="device peak to compare with (overrides the table)"
    )
    parser.add_argument(
        "--skip-separate", action="store_true", help="stage 1: skip the k single-block runs"
    )
    parser.add_argument(
        "--skip-dmd-pass", action="store_true", help="skip the DMD moments-pass ratio"
    )
    parser.add_argument(
        "--dmd-repeats", type=int, default=5, help="batches timed for the DMD ratio"
    )
    parser.add_argument(
        "--dmd-compute-dtype",
        choices=["float64", "float32"],
        default="float32",
        help="MomentAccumulator compute_dtype for the DMD ratio (default float32, dmd's default)",
    )


def _dmd_options(parser: argparse.ArgumentParser) -> None:
    """The options of `bench dmd` (sizes of the synthetic trajectories, budgets, solvers)."""
    parser.add_argument("--dim", type=int, default=128, help="feature width d (default 128)")
    parser.add_argument("--layers", type=int, default=12, help="transitions L (default 12)")
    parser.add_argument("--tokens", type=int, default=65, help="tokens per image T (default 65)")
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[200, 2000],
        help="calibration budgets B in images (default 200 2000: 10x)",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="images per update (default 50)")
    parser.add_argument(
        "--solvers", nargs="+", default=["ridge", "pcr", "rrr"], help="dmd.solvers names"
    )
    parser.add_argument("--rank", type=int, default=32, help="rank for pcr/rrr (default 32)")
    parser.add_argument("--alpha", type=float, default=1e-4, help="relative ridge (default 1e-4)")
    parser.add_argument(
        "--compute-dtype",
        choices=["float64", "float32"],
        default="float32",
        help="dtype of the products in the budget runs (accumulation is always float64)",
    )
    parser.add_argument(
        "--max-update-mib",
        type=float,
        default=256,
        help="MomentAccumulator max_update_bytes in MiB (default 256, dmd.update_memory_mib)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved timed rounds, medians (default 5)"
    )
    parser.add_argument(
        "--teacher",
        default="vit_small_patch16_224",
        help="timm ViT (random weights) for the moments-pass ratio (default ViT-S/16)",
    )
    parser.add_argument(
        "--teacher-batch", type=int, default=8, help="images per teacher batch (default 8)"
    )
    parser.add_argument(
        "--skip-teacher", action="store_true", help="skip the moments-pass / forward ratio"
    )


def _data_options(parser: argparse.ArgumentParser) -> None:
    """The options of `bench data` (synthetic images, transform, loader workers)."""
    parser.add_argument("--images", type=int, default=512, help="synthetic images (default 512)")
    parser.add_argument(
        "--image-size", default="500x375", help="WxH of the synthetic JPEGs (default 500x375)"
    )
    parser.add_argument("--classes", type=int, default=4, help="class folders (default 4)")
    parser.add_argument(
        "--input-size", type=int, default=224, help="transform output side (default 224)"
    )
    parser.add_argument(
        "--crop-pct",
        type=float,
        default=1.0,
        help="resize side = input/crop_pct, also the stored crop side (default 1.0, DINOv2's)",
    )
    parser.add_argument(
        "--interpolation", default="bicubic", help="resize interpolation (default bicubic)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers W to try"
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        choices=["cpu", "gpu"],
        default=["cpu"],
        help="data.decode values to time (gpu: decode_jpeg on the current CUDA device)",
    )
    parser.add_argument(
        "--dir", help="keep the synthetic images and shards here (empty or new folder)"
    )


def _growth_options(parser: argparse.ArgumentParser) -> None:
    """The options of `bench growth` (the axis, its values, the base sizes)."""
    parser.add_argument("--vary", choices=growth.AXES, default="dim", help="axis (default dim)")
    parser.add_argument(
        "--values",
        type=int,
        nargs="+",
        default=[96, 192, 384],
        help="its sizes (default 96 192 384)",
    )
    parser.add_argument("--dim", type=int, default=192, help="base width (default 192)")
    parser.add_argument(
        "--tokens", type=int, default=65, help="base tokens, square + 1 (default 65)"
    )
    parser.add_argument("--layers", type=int, default=4, help="base depth L (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, median (default 5)")


# action -> (module whose run(args) returns the figures, its options, help, takes --device)
ACTIONS = {
    "train": (
        train,
        _train_options,
        "timed training steps of stage 1 or 2 on synthetic images",
        True,
    ),
    "data": (
        data,
        _data_options,
        "shard decode + transform throughput: full images vs stored crops",
        False,
    ),
    "dmd": (
        dmd,
        _dmd_options,
        "streaming DMD moments and solvers: time and memory vs budget B",
        True,
    ),
    "growth": (
        growth,
        _growth_options,
        "cost per image vs width, tokens or layers: FLOP-count prediction vs measurement",
        True,
    ),
}
