"""`raptor bench dmd`: the streaming DMD moments and every solver on synthetic
trajectories for several calibration budgets B: time split accumulate/solve and
peak memory (flat in B). On CPU, glibc is first made to return freed tensors at
once (`common.release_freed_memory`) so that the peak follows the live tensors.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

import torch

from raptor.bench.common import (
    MiB,
    PeakMemory,
    Stopwatch,
    environment,
    peak_dtype,
    peak_flops_or_none,
    print_pairs,
    print_table,
    release_freed_memory,
    resolve_device,
    result_device_name,
    to_mib,
)


def synthetic_trajectory(
    batch: int,
    num_layers: int,
    tokens: int,
    dim: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """(batch, L+1, T, D) float32: a random walk along depth, x_{l+1} = x_l + noise."""
    steps = torch.randn(batch, num_layers + 1, tokens, dim, generator=generator, device=device)
    return steps.cumsum_(dim=1)


def dmd_budget(
    images: int,
    dim: int,
    num_layers: int,
    tokens: int,
    batch: int,
    solvers: Sequence[str],
    rank: Optional[int],
    alpha: float,
    device: torch.device,
    compute_dtype: str,
    seed: int = 0,
) -> Dict[str, Any]:
    """Stream `images` synthetic trajectories into a MomentAccumulator, then fit the
    span (0, L) with every solver and read its exact-DMD spectrum; times and peak
    memory of each part (the synthetic data is made outside the timed sections)."""
    from dmd.fit import fit
    from dmd.moments import MomentAccumulator

    gen = torch.Generator(device).manual_seed(seed)
    acc = MomentAccumulator(
        num_layers, dim, device=device, compute_dtype=getattr(torch, compute_dtype)
    )
    clock = Stopwatch(device)
    with PeakMemory(device) as mem_acc:
        for start in range(0, images, batch):
            traj = synthetic_trajectory(
                min(batch, images - start), num_layers, tokens, dim, gen, device
            )
            with clock():
                acc.update(traj)
            del traj
    row: Dict[str, Any] = {
        "images": images,
        "accumulate_s": clock.seconds,
        "accumulate_images_per_s": images / clock.seconds,
        "accumulate_peak_mib": to_mib(mem_acc.bytes),
    }
    solve_s, solve_peak = 0.0, []
    for solver in solvers:
        sw = Stopwatch(device)
        with PeakMemory(device) as mem, sw():
            op = fit(acc, (0, num_layers), "span", solver, rank, alpha)
            op.eigenvalues()
        row[f"{solver}_s"] = sw.seconds
        solve_s += sw.seconds
        solve_peak.append(mem.bytes)
    row["solve_peak_mib"] = None if None in solve_peak else to_mib(max(solve_peak))
    row["accumulate_share"] = clock.seconds / (clock.seconds + solve_s)
    return row


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from raptor.bench import flops

    device = resolve_device(args.device)
    if device.type == "cpu":
        release_freed_memory()
    budgets = sorted(set(args.budgets))
    rows = [
        dmd_budget(
            images,
            args.dim,
            args.layers,
            args.tokens,
            args.batch_size,
            args.solvers,
            args.rank,
            args.alpha,
            device,
            args.compute_dtype,
        )
        for images in [args.batch_size] + budgets  # the first run warms up kernels and workspaces
    ][1:]
    moment_bytes = flops.dmd_moment_bytes(args.layers, args.dim)
    per_image = flops.dmd_moments_flops(args.layers, args.tokens, args.dim)
    dtype = "fp64" if args.compute_dtype == "float64" else peak_dtype("32-true")
    peak = peak_flops_or_none(result_device_name(device), dtype, None, device)
    for row in rows:
        row["accumulate_gflop_per_s"] = per_image * row["accumulate_images_per_s"] / 1e9
        if peak:
            row[f"accumulate_fraction_of_{dtype}_peak"] = row["accumulate_gflop_per_s"] * 1e9 / peak
    first, last = rows[0], rows[-1]
    summary = {
        "moments_mib (analytic, float64)": moment_bytes / MiB,
        "flops_per_image (moments)": float(per_image),
        "budget_ratio": last["images"] / first["images"],
        "accumulate_peak_ratio": _ratio(last["accumulate_peak_mib"], first["accumulate_peak_mib"]),
        "accumulate_time_ratio": last["accumulate_s"] / first["accumulate_s"],
    }
    result = {
        "bench": "dmd",
        "params": {
            "dim": args.dim,
            "layers": args.layers,
            "tokens": args.tokens,
            "batch_size": args.batch_size,
            "solvers": list(args.solvers),
            "rank": args.rank,
            "alpha": args.alpha,
            "compute_dtype": args.compute_dtype,
            "memory": PeakMemory(device).what,
        },
        "env": environment(device),
        "budgets": rows,
        "summary": summary,
    }
    print_pairs("raptor bench dmd", {**result["params"], "device": result["env"]["device_name"]})
    print_table(
        "per calibration budget (span (0, L), every solver; times in s, memory in MiB)", rows
    )
    print_pairs("summary", summary)
    return result


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b
