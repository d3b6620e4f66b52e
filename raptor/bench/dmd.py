"""`raptor bench dmd`: the streaming DMD moments and every solver on synthetic
trajectories.

- `paths`: one update of a (batch, L+1, T, d) float32 batch by the update before
  issue 17 (`whole_batch_update`: a float64 copy of the batch, products batched over
  layers) and by `MomentAccumulator.update` (row blocks, layer after layer) with
  float64 and float32 products, side by side: median time over interleaved repeats,
  and what the update allocated (`allocator_peak` on CPU, the CUDA allocator's peak
  on a GPU);
- `teacher`: a timm ViT (random weights) through `Teacher.trajectory`, alone and
  followed by an update in each compute dtype, interleaved, medians: the moments
  pass over the teacher's forward as a ratio;
- `budgets`: accumulation for several calibration budgets B, then every solver:
  time split accumulate/solve and peak memory (flat in B). On CPU, glibc is first
  made to return freed tensors at once (`common.release_freed_memory`) so that the
  peak follows the live tensors.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Sequence

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
    spread,
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


def whole_batch_update(acc: Any, trajectory: torch.Tensor) -> None:
    """The update before issue 17, kept to compare with: the whole batch copied to
    float64 in layer-major order, each moment's products batched over the layers
    (trajectories only: no valid mask, token slice or MLP outputs)."""
    L, D = acc.num_layers, acc.dim
    x = trajectory.to(acc.device, torch.float64).transpose(0, 1).reshape(L + 1, -1, D)
    xt = x.transpose(1, 2)
    acc.grams.baddbmm_(xt, x)
    acc.crosses.baddbmm_(xt[1:], x[:-1])
    if acc.endpoints:
        acc.ends.baddbmm_(xt[acc._ends_b], x[acc._ends_a])
    acc.sums += x.sum(1)
    acc.counts += torch.tensor(
        [x.shape[1], trajectory.shape[0]], dtype=torch.float64, device=acc.device
    )


def allocator_peak(work: Callable[[], Any]) -> int:
    """Bytes: the largest total, above the start, of what torch's CPU allocator held
    for `work()` (every allocation and free, from the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _update_peak(work: Callable[[], Any], device: torch.device) -> int:
    if device.type == "cpu":
        return allocator_peak(work)
    with PeakMemory(device) as mem:
        work()
    return mem.bytes


PATHS = ("whole-batch float64 (before)", "blocks float64", "blocks float32")


def _path_update(path: str, acc: Any) -> Callable[[torch.Tensor], None]:
    return (lambda t: whole_batch_update(acc, t)) if path == PATHS[0] else acc.update


def compare_paths(
    trajectory: torch.Tensor, repeats: int, max_update_bytes: int, device: torch.device
) -> List[Dict[str, Any]]:
    """One row per update path (module docstring): median seconds per update over
    `repeats` interleaved rounds (after one warm-up each), bytes the update allocated,
    and the largest relative difference of its moments from the float64 paths'."""
    from dmd.moments import MomentAccumulator

    L, D = trajectory.shape[1] - 1, trajectory.shape[-1]

    def make(path: str) -> Any:
        dtype = torch.float32 if path.endswith("float32") else torch.float64
        return MomentAccumulator(
            L, D, device=device, compute_dtype=dtype, max_update_bytes=max_update_bytes
        )

    times: Dict[str, List[float]] = {p: [] for p in PATHS}
    for rnd in range(repeats + 1):
        for path in PATHS:
            update, sw = _path_update(path, make(path)), Stopwatch(device)
            with sw():
                update(trajectory)
            if rnd:
                times[path].append(sw.seconds)
    rows, reference = [], None
    for path in PATHS:
        acc = make(path)
        update = _path_update(path, acc)
        peak = _update_peak(lambda: update(trajectory), device)  # noqa: B023 (called here)
        reference = acc.buffer if reference is None else reference
        diff = (acc.buffer - reference).abs().max() / reference.abs().max()
        rows.append(
            {
                "path": path,
                "update_s": spread(times[path])["median"],
                "allocated_mib": to_mib(peak),
                "batch_mib": to_mib(trajectory.nbytes),
                "max_rel_diff": float(diff),
            }
        )
    return rows


def teacher_ratio(
    name: str, batch: int, repeats: int, max_update_bytes: int, device: torch.device
) -> Dict[str, Any]:
    """The moments pass (`Teacher.trajectory` then `update`) over the forward alone, for
    float64 and float32 products, on the same random images; interleaved rounds
    (after one warm-up), medians."""
    import timm

    from dmd.moments import MomentAccumulator
    from raptor.bench import flops
    from raptor.model.teacher import Teacher

    teacher = Teacher(timm.create_model(name, pretrained=False, num_classes=0)).to(device).eval()
    size = teacher.vit.patch_embed.img_size
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    L, D = teacher.num_layers, teacher.embed_dim
    accs = {
        dtype: MomentAccumulator(
            L, D, device=device, compute_dtype=dtype, max_update_bytes=max_update_bytes
        )
        for dtype in ("float64", "float32")
    }
    times: Dict[str, List[float]] = {k: [] for k in ("forward", *accs)}
    with torch.no_grad():
        for rnd in range(repeats + 1):
            for what in times:
                sw = Stopwatch(device)
                with sw():
                    traj = teacher.trajectory(images)
                    if what in accs:
                        accs[what].update(traj)
                if rnd:
                    times[what].append(sw.seconds)
    forward = spread(times["forward"])["median"]
    moments = flops.dmd_moments_flops(L, teacher.num_tokens, D)
    out = {
        "teacher": name,
        "batch": batch,
        "tokens": teacher.num_tokens,
        "dim": D,
        "layers": L,
        "forward_s": forward,
        "analytic_flop_ratio": 1
        + moments / flops.teacher_forward_flops(flops.vit_shape(teacher.vit)),
    }
    for dtype in accs:
        with_moments = spread(times[dtype])["median"]
        out[f"forward_and_{dtype}_moments_s"] = with_moments
        out[f"ratio_{dtype}"] = with_moments / forward
    return out


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
    max_update_bytes: int,
    seed: int = 0,
) -> Dict[str, Any]:
    """Stream `images` synthetic trajectories into a MomentAccumulator, then fit the
    span (0, L) with every solver and read its exact-DMD spectrum; times and peak
    memory of each part (the synthetic data is made outside the timed sections)."""
    from dmd.fit import fit
    from dmd.moments import MomentAccumulator

    gen = torch.Generator(device).manual_seed(seed)
    acc = MomentAccumulator(
        num_layers,
        dim,
        device=device,
        compute_dtype=compute_dtype,
        max_update_bytes=max_update_bytes,
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
    limit = int(args.max_update_mib * MiB)
    gen = torch.Generator(device).manual_seed(0)
    batch = synthetic_trajectory(args.batch_size, args.layers, args.tokens, args.dim, gen, device)
    paths = compare_paths(batch, args.repeats, limit, device)
    del batch
    teacher = (
        None
        if args.skip_teacher
        else teacher_ratio(args.teacher, args.teacher_batch, args.repeats, limit, device)
    )
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
            limit,
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
            "max_update_mib": args.max_update_mib,
            "repeats": args.repeats,
            "memory": PeakMemory(device).what,
            "update_memory": "torch CPU allocator (profiler memory events)"
            if device.type == "cpu"
            else PeakMemory(device).what,
        },
        "env": environment(device),
        "paths": paths,
        "teacher": teacher,
        "budgets": rows,
        "summary": summary,
    }
    print_pairs("raptor bench dmd", {**result["params"], "device": result["env"]["device_name"]})
    print_table(
        f"one update of a ({args.batch_size}, {args.layers + 1}, {args.tokens}, {args.dim}) "
        f"float32 batch, old and new paths (median s of {args.repeats}; MiB allocated)",
        paths,
    )
    if teacher is not None:
        print_pairs(
            f"moments pass over the teacher's forward (median of {args.repeats}, interleaved)",
            teacher,
        )
    print_table(
        "per calibration budget (span (0, L), every solver; times in s, memory in MiB)", rows
    )
    print_pairs("summary", summary)
    return result


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b
