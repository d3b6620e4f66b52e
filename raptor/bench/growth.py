"""`raptor bench growth`: how the cost of the main computations grows with the model's
size, predicted from the FLOP counts (`raptor.bench.flops`) and measured at several sizes.

One axis (`--vary dim|tokens|layers`) takes each of `--values`; the others stay at
their base. At each size it times, per image (median of `--repeats`, after one warm-up):

- `teacher_fwd`: a random timm ViT's forward to a trajectory (what `raptor phases`,
  `raptor dmd` and `raptor eval` pay per image, and every training step's teacher);
- `stage2_step`: that forward plus the surrogate's L-step rollout, forward and backward
  (`raptor fit` stage 2, optimizer step left out);
- `dmd_moments`: one `dmd.moments.MomentAccumulator.update` on the trajectory.

The prediction for each size scales the largest size's measured time by the FLOP ratio
(the largest is the least dominated by fixed per-call overheads); measured / predicted
near 1 means the FLOP count is a usable cost model on that device.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, Dict, List

import torch

from raptor.bench import flops
from raptor.bench.common import Stopwatch, environment, print_pairs, print_table, resolve_device

AXES = ("dim", "tokens", "layers")


def shapes(base: Dict[str, int], axis: str, value: int) -> Dict[str, int]:
    """The base sizes with `axis` set to `value` (tokens = patches + 1 cls, square grid)."""
    size = {**base, axis: int(value)}
    side = round((size["tokens"] - 1) ** 0.5)
    if side * side + 1 != size["tokens"]:
        raise SystemExit(
            f"bench growth: tokens must be a square + 1 (65, 197, ...), got {size['tokens']}"
        )
    if size["dim"] % 32:
        raise SystemExit(
            f"bench growth: dim must be a multiple of 32 (heads of 32), got {size['dim']}"
        )
    return size


def build(size: Dict[str, int], device: torch.device):
    """A random teacher ViT (GELU MLP x4, patch 16, cls only) and a Raptor (k=2, SwiGLU
    MLP x4, depth conditioning) of `size`."""
    import timm

    from raptor.model.raptor import Raptor
    from raptor.model.teacher import Teacher

    side = round((size["tokens"] - 1) ** 0.5)
    D, L = size["dim"], size["layers"]
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16 * side,
        embed_dim=D,
        depth=L,
        num_heads=D // 32,
        num_classes=0,
    )
    teacher = Teacher(vit.eval()).to(device)
    raptor = Raptor(L, [max(1, L // 2)] if L > 1 else [], D, D // 32).to(device)
    return teacher, raptor


def per_image_flops(teacher, raptor) -> Dict[str, int]:
    tshape = flops.vit_shape(teacher.vit)
    fwd = flops.teacher_forward_flops(tshape)
    step = flops.stage2_flops(tshape, flops.block_shape(raptor.blocks[0]), raptor.num_layers)
    return {
        "teacher_fwd": fwd,
        "stage2_step": step.total,
        "dmd_moments": flops.dmd_moments_flops(
            teacher.num_layers, teacher.num_tokens, teacher.embed_dim
        ),
    }


def timings(teacher, raptor, batch: int, repeats: int, device) -> Dict[str, float]:
    """Median seconds per image of each computation (module docstring)."""
    from dmd.moments import MomentAccumulator

    C, H, W = 3, *teacher.vit.patch_embed.img_size
    images = torch.randn(batch, C, H, W, device=device)
    acc = MomentAccumulator(teacher.num_layers, teacher.embed_dim, device=device)
    traj = teacher.trajectory(images)

    def stage2() -> None:
        out = raptor(teacher.trajectory(images)[:, 0])
        out.square().mean().backward()

    work: Dict[str, Callable[[], Any]] = {
        "teacher_fwd": lambda: teacher.trajectory(images),
        "stage2_step": stage2,
        "dmd_moments": lambda: acc.update(traj),
    }
    samples: Dict[str, List[float]] = {name: [] for name in work}
    for i in range(repeats + 1):  # interleaved; the first round warms up
        for name, fn in work.items():
            clock = Stopwatch(device)
            with clock():
                fn()
            if i:
                samples[name].append(clock.seconds / batch)
    return {name: statistics.median(xs) for name, xs in samples.items()}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = resolve_device(args.device)
    if args.vary not in AXES or len(args.values) < 2:
        raise SystemExit(f"bench growth: --vary one of {AXES} over at least 2 --values")
    base = {"dim": args.dim, "tokens": args.tokens, "layers": args.layers}
    measured = []
    for value in args.values:
        size = shapes(base, args.vary, value)
        torch.manual_seed(0)
        teacher, raptor = build(size, device)
        measured.append(
            (
                size,
                per_image_flops(teacher, raptor),
                timings(teacher, raptor, args.batch_size, args.repeats, device),
            )
        )
    ref_size, ref_flops, ref_time = max(measured, key=lambda m: m[1]["stage2_step"])
    rows = []
    for size, counts, seconds in measured:
        for name in counts:
            predicted = ref_time[name] * counts[name] / ref_flops[name]
            rows.append(
                {
                    "computation": name,
                    args.vary: size[args.vary],
                    "gflop_per_image": counts[name] / 1e9,
                    "measured_ms_per_image": seconds[name] * 1e3,
                    "predicted_ms_per_image": predicted * 1e3,
                    "measured_over_predicted": seconds[name] / predicted,
                    "gflop_per_s": counts[name] / seconds[name] / 1e9,
                }
            )
    rows.sort(key=lambda r: (r["computation"], r[args.vary]))
    result = {
        "bench": "growth",
        "params": {
            "vary": args.vary,
            "values": list(args.values),
            "base": base,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "prediction": f"time at the largest size x FLOP ratio ({args.vary}={ref_size[args.vary]})",
        },
        "env": environment(device),
        "rows": rows,
    }
    print_pairs("raptor bench growth", result["params"])
    print_table("per image: FLOP count, measured and predicted time", rows)
    return result
