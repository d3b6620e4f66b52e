"""`raptor bench train|dmd|data`: throughput, time and memory benchmarks.

- `raptor bench train CONFIG [k=v ...]`: timed optimizer steps of the real stage-1
  or stage-2 Lightning module on synthetic images, with a teacher of random
  weights (throughput does not depend on weight values). Prints images/s, step
  time (median, IQR), peak memory, FLOPs per image (`raptor.flops`), achieved
  FLOP/s and its fraction of the device's peak; for stage 1 also the per-image
  cost of k single-block runs over one run with all k blocks, and the cost of a
  DMD moments pass over the teacher's forward alone, both measured in the run.
- `raptor bench dmd`: the streaming moments and every solver on synthetic
  trajectories for several calibration budgets B: time split accumulate/solve
  and peak memory (flat in B).
- `raptor bench data`: images/s through shard reading, JPEG decoding and the
  evaluation transform with W loader workers, for shards of full images and of
  stored center crops, made from a synthetic image folder.

Every command prints a table and, with `--json PATH`, writes its figures there.
Peak memory is the CUDA allocator's high-water mark above the memory in use when
the measured work starts (`torch.cuda.max_memory_allocated`), or on CPU the
process's resident-set high-water mark above the resident set at start (Linux
VmHWM, reset through /proc/self/clear_refs). For its CPU figures to follow the
live tensors, `bench dmd` makes glibc serve every block of 256 KiB or more with
mmap (`mallopt(M_MMAP_THRESHOLD)`), so a freed tensor leaves the resident set at
once; with glibc's default, freed blocks stay resident and the high-water mark
also measures heap fragmentation (seen here: 56 vs 98 MiB for the same work).
`bench train` leaves the allocator alone (its timings are those of a normal run),
so its CPU peak includes what the allocator keeps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback

MiB = 2**20

# --------------------------------------------------------------------------- measuring


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def release_freed_memory() -> bool:
    """glibc: serve blocks >= 256 KiB with mmap so that freeing a tensor returns its
    memory to the OS at once (module docstring). False where it is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 256 * 1024))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _reset_rss_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: `.bytes` = peak memory of the enclosed work above what was in use
    at its start (module docstring), `.total` = the peak itself (CUDA allocator or
    process RSS); None where it cannot be measured (CPU without /proc)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: Optional[int] = None
        self.total: Optional[int] = None
        self.what = (
            "CUDA max_memory_allocated above start"
            if device.type == "cuda"
            else "process RSS high-water mark above start"
        )

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._ok = _reset_rss_peak()
            self._start = _proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.total = torch.cuda.max_memory_allocated(self.device)
            self.bytes = self.total - self._start
        elif self._ok and self._start is not None:
            peak = _proc_status_kib("VmHWM")
            if peak is not None:
                self.total, self.bytes = peak * 1024, max(0, peak - self._start) * 1024


class Stopwatch:
    """Accumulates the wall time of `with sw():` sections, synchronizing CUDA at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds += time.perf_counter() - start


def spread(seconds: Sequence[float]) -> Dict[str, float]:
    """Median and interquartile range of a list of times."""
    xs = sorted(seconds)
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "iqr": 0.0}
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1}


def environment(device: torch.device) -> Dict[str, Any]:
    """Hardware and software a figure was measured on."""
    import lightning
    import timm

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpu": _cpu_model(),
        "cpu_cores": _cpu_count(),
        "load_average": list(_loadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "device": device.type,
        "device_name": result_device_name(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def result_device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _loadavg() -> tuple:
    import os

    return tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else ()


# --------------------------------------------------------------------------- reporting


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def print_table(title: str, rows: List[Dict[str, Any]]) -> None:
    """A fixed-width table of dict rows (columns = keys of the first row)."""
    print(f"\n{title}")
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def print_pairs(title: str, pairs: Dict[str, Any]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in pairs)
    for k, v in pairs.items():
        print(f"  {k.ljust(width)} : {_fmt(v)}")


def write_json(path: Optional[str], result: Dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")


def _mib(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / MiB


# --------------------------------------------------------------------------- bench dmd


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

    dev = device
    gen = torch.Generator(dev).manual_seed(seed)
    acc = MomentAccumulator(
        num_layers, dim, device=dev, compute_dtype=getattr(torch, compute_dtype)
    )
    clock = Stopwatch(dev)
    with PeakMemory(dev) as mem_acc:
        for start in range(0, images, batch):
            traj = synthetic_trajectory(
                min(batch, images - start), num_layers, tokens, dim, gen, dev
            )
            with clock():
                acc.update(traj)
            del traj
    row: Dict[str, Any] = {
        "images": images,
        "accumulate_s": clock.seconds,
        "accumulate_images_per_s": images / clock.seconds,
        "accumulate_peak_mib": _mib(mem_acc.bytes),
    }
    solve_s, solve_peak = 0.0, []
    for solver in solvers:
        sw = Stopwatch(dev)
        with PeakMemory(dev) as mem, sw():
            op = fit(acc, (0, num_layers), "span", solver, rank, alpha)
            op.eigenvalues()
        row[f"{solver}_s"] = sw.seconds
        solve_s += sw.seconds
        solve_peak.append(mem.bytes)
    row["solve_peak_mib"] = None if None in solve_peak else _mib(max(solve_peak))
    row["accumulate_share"] = clock.seconds / (clock.seconds + solve_s)
    return row


def bench_dmd(args: argparse.Namespace) -> Dict[str, Any]:
    from raptor import flops

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
    peak = flops.peak_flops(result_device_name(device), dtype) if device.type == "cuda" else None
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


# --------------------------------------------------------------------------- bench train

ATTN_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Restrict F.scaled_dot_product_attention to one backend (`auto`: PyTorch chooses)."""
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, ATTN_BACKENDS[name])]):
        yield


def peak_dtype(precision: str) -> str:
    """The peak column that bounds a Lightning precision: tensor-core bf16/fp16 for mixed
    or half precision, else tf32 when float32 matmuls may use TF32, else fp32."""
    if precision.startswith(("bf16", "16")):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


class StepTimer(Callback):
    """Times the training steps after `warmup` (batch start to batch end, optimizer step
    included; CUDA events on GPU), the wall time of the whole timed stretch and its
    peak memory."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.cuda = warmup, device.type == "cuda"
        self.marks: List[List[Any]] = []
        self.memory = PeakMemory(device)
        self.wall = 0.0

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.memory.__enter__()  # synchronizes CUDA
            self._wall0 = time.perf_counter()
        if batch_idx >= self.warmup:
            self.marks.append([self._mark(), None])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.marks[-1][1] = self._mark()

    def on_train_end(self, trainer, module) -> None:
        if self.marks:
            self.memory.__exit__(None, None, None)  # synchronizes CUDA
            self.wall = time.perf_counter() - self._wall0

    @property
    def step_seconds(self) -> List[float]:
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up banner (GPU available, tips) during timed runs."""
    import logging

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def synthetic_loader(batch: Dict[str, torch.Tensor], steps: int):
    """A DataLoader yielding the same (device-resident) batch `steps` times."""
    from torch.utils.data import DataLoader, IterableDataset

    class Repeat(IterableDataset):
        def __iter__(self):
            return (batch for _ in range(steps))

    return DataLoader(Repeat(), batch_size=None, num_workers=0)


def synthetic_batch(
    teacher: Any, batch_size: int, device: torch.device, seed: int = 0
) -> Dict[str, torch.Tensor]:
    """Random normalized images at the teacher's input size, in the batch format of raptor.data."""
    C, H, W = teacher.data_config["input_size"]
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch_size, C, H, W, generator=gen).to(device),
        "label": torch.zeros(batch_size, dtype=torch.long, device=device),
        "valid": torch.ones(batch_size, dtype=torch.bool, device=device),
    }


def bench_config(args: argparse.Namespace):
    """The config with the benchmark's changes: random teacher weights (no file, no hub,
    no head), one device, an even phase split when the config has none."""
    from raptor.cli import config_from_args

    cfg = config_from_args(args)
    cfg.teacher.pretrained, cfg.teacher.weights, cfg.teacher.head = False, "", ""
    cfg.train.init_from = ""
    if args.stage is not None:
        cfg.train.stage = args.stage
    if args.batch_size is not None:
        cfg.data.batch_size = args.batch_size
    return cfg


def even_boundaries(num_layers: int, k: int) -> List[int]:
    """k phases of (nearly) equal length: the partition used when the config names none."""
    return [round(num_layers * (j + 1) / k) for j in range(k - 1)]


def build_models(cfg, device: torch.device, args: argparse.Namespace):
    """Teacher (random weights) and Raptor on `device`, with compile/checkpointing applied."""
    import warnings

    from raptor.surrogate import Raptor
    from raptor.teacher import Teacher

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has random weights.*")
        teacher = Teacher.from_config(cfg.teacher)
    if cfg.phases.boundaries is None and not cfg.phases.file:
        cfg.phases.boundaries = even_boundaries(teacher.num_layers, int(cfg.model.k))
    from raptor.distill import phase_boundaries

    raptor = Raptor.from_config(cfg.model, teacher, phase_boundaries(cfg, teacher.num_layers))
    teacher.to(device)
    raptor.to(device)
    for block in raptor.blocks:
        block.checkpoint_activations = bool(args.activation_checkpointing)
    if args.compile:
        for block in list(raptor.blocks) + list(teacher.vit.blocks):
            block.compile()
    return teacher, raptor


def timed_run(
    cfg,
    teacher,
    raptor,
    blocks: Optional[List[int]],
    batch: Dict[str, torch.Tensor],
    device: torch.device,
    args: argparse.Namespace,
) -> Dict[str, Any]:
    """warmup + steps optimizer steps of the real `Distiller` in a Lightning Trainer."""
    import warnings

    from raptor import losses
    from raptor.distill import Distiller, stage_config
    from raptor.runs import make_trainer

    module = Distiller(cfg, teacher, raptor, blocks)
    timer = StepTimer(args.warmup, device)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="raptor-bench-") as tmp, quiet_lightning():
        trainer = make_trainer(
            cfg,
            Path(tmp),
            max_steps=total,
            callbacks=[timer],
            loggers=[],
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            num_nodes=1,
            strategy="auto",
            precision=args.precision,
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            gradient_clip_val=float(stage_config(cfg).grad_clip) or None,
        )
        with warnings.catch_warnings(), attention_backend(args.attn_backend):
            warnings.simplefilter("ignore")  # Lightning's advice on workers, eval-mode modules, ...
            trainer.fit(module, train_dataloaders=synthetic_loader(batch, total))
    B = batch["image"].shape[0]
    times = timer.step_seconds
    timed = range(args.warmup, total)
    tf_steps = (
        sum(losses.tf_ratio(s, module.anneal_steps) > 0 for s in timed) if module.stage == 1 else 0
    )
    return {
        "images_per_s": len(times) * B / timer.wall,
        "step_s": spread(times),
        "peak_memory_mib": _mib(timer.memory.total),
        "tf_fraction": tf_steps / len(timed),
    }


def step_flops(
    cfg, teacher, raptor, blocks: Optional[List[int]], tf_fraction: float
) -> Dict[str, float]:
    """Model FLOPs per image of one step (`raptor.flops`), averaged over the timed steps;
    in stage 1 a fraction `tf_fraction` of them ran the teacher-forcing pass."""
    from raptor import flops

    tshape, bshape = flops.vit_shape(teacher.vit), flops.block_shape(raptor.blocks[0])
    if int(cfg.train.stage) == 2:
        on = off = flops.stage2_flops(tshape, bshape, raptor.num_layers)
    else:
        on = flops.stage1_flops(tshape, bshape, raptor.phases, blocks, True)
        off = flops.stage1_flops(tshape, bshape, raptor.phases, blocks, False)
    out = {
        key: tf_fraction * getattr(on, key) + (1 - tf_fraction) * getattr(off, key)
        for key in ("teacher", "surrogate", "applications")
    }
    out["total"] = out["teacher"] + out["surrogate"]
    return out


def largest_fitting(fits: Callable[[int], bool], start: int, multiple: int = 8) -> int:
    """The largest batch b (a multiple of `multiple`, or `start`) with fits(b), assuming
    fits is monotone: doubling from `start`, then bisection. 0 if not even `start` fits."""
    if not fits(start):
        return 0
    lo, hi = start, 2 * start
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_batch(cfg, teacher, raptor, blocks, device: torch.device, args: argparse.Namespace) -> int:
    """The largest batch whose training step runs without a CUDA out-of-memory error."""
    import gc

    probe = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1})

    def fits(b: int) -> bool:
        try:
            timed_run(
                cfg, teacher, raptor, blocks, synthetic_batch(teacher, b, device), device, probe
            )
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            raptor.zero_grad(set_to_none=True)  # gradients of a failed try
            gc.collect()
            torch.cuda.empty_cache()

    found = largest_fitting(fits, int(cfg.data.batch_size))
    if not found:
        raise SystemExit(f"--max-batch: even batch {cfg.data.batch_size} runs out of memory")
    return found


def separate_runs(
    cfg, teacher, raptor, batch, device, args, joint: Dict[str, Any], joint_flops
) -> Dict[str, Any]:
    """Stage 1 trained as k single-block runs (`train.blocks=[j]`, each with its own teacher
    forward) vs the joint run: per-image times and their ratio, measured and by FLOPs."""
    per_image, separate_flops = [], 0.0
    for j in range(raptor.k):
        run = timed_run(cfg, teacher, raptor, [j], batch, device, args)
        per_image.append(1.0 / run["images_per_s"])
        separate_flops += step_flops(cfg, teacher, raptor, [j], run["tf_fraction"])["total"]
    return {
        "per_image_s_joint": 1.0 / joint["images_per_s"],
        "per_image_s_separate": per_image,
        "measured_ratio_separate_over_joint": sum(per_image) * joint["images_per_s"],
        "analytic_ratio_separate_over_joint": separate_flops / joint_flops["total"],
    }


def dmd_pass_ratio(
    teacher: Any,
    batch: Dict[str, torch.Tensor],
    device: torch.device,
    repeats: int,
    compute_dtype: str,
) -> Dict[str, float]:
    """Time of (teacher trajectory + MomentAccumulator.update) over the teacher trajectory
    alone, on the same images, interleaved `repeats` times (after one warm-up of each)."""
    from dmd.moments import MomentAccumulator
    from raptor import flops

    acc = MomentAccumulator(
        teacher.num_layers,
        teacher.embed_dim,
        device=device,
        compute_dtype=getattr(torch, compute_dtype),
    )
    images = batch["image"]
    forward, with_moments = Stopwatch(device), Stopwatch(device)
    with torch.no_grad():
        for i in range(repeats + 1):
            if i == 1:
                forward.seconds = with_moments.seconds = 0.0
            with forward():
                teacher.trajectory(images)
            with with_moments():
                acc.update(teacher.trajectory(images))
    moments = flops.dmd_moments_flops(teacher.num_layers, teacher.num_tokens, teacher.embed_dim)
    return {
        "teacher_forward_s": forward.seconds / repeats,
        "moments_pass_s": with_moments.seconds / repeats,
        "ratio": with_moments.seconds / forward.seconds,
        "compute_dtype": compute_dtype,
        "gflop_per_image_moments": moments / 1e9,
        "analytic_flop_ratio_moments_over_forward": moments
        / flops.teacher_forward_flops(flops.vit_shape(teacher.vit)),
    }


def bench_train(args: argparse.Namespace) -> Dict[str, Any]:
    from raptor.distill import selected_blocks
    from raptor.runs import default_precision

    device = resolve_device(args.device)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if (
        args.attn_backend != "auto"
        and device.type == "cpu"
        and args.attn_backend not in ("math", "flash")
    ):
        raise SystemExit(
            f"--attn-backend {args.attn_backend} needs CUDA; on CPU use auto, math or flash"
        )
    if args.max_batch and device.type != "cuda":
        raise SystemExit(
            "--max-batch searches the largest batch that fits in GPU memory: needs CUDA"
        )
    cfg = bench_config(args)
    cfg.trainer.accelerator = "gpu" if device.type == "cuda" else "cpu"
    args.precision = args.precision or default_precision(cfg)
    torch.manual_seed(0)
    teacher, raptor = build_models(cfg, device, args)
    stage = int(cfg.train.stage)
    blocks = selected_blocks(cfg, raptor.k)
    if args.max_batch:
        cfg.data.batch_size = max_batch(cfg, teacher, raptor, blocks, device, args)
    batch = synthetic_batch(teacher, int(cfg.data.batch_size), device)

    main_run = timed_run(cfg, teacher, raptor, blocks, batch, device, args)
    counts = step_flops(cfg, teacher, raptor, blocks, main_run["tf_fraction"])
    device_name = result_device_name(device)
    dtype = peak_dtype(args.precision)
    peak = peak_flops_or_none(device_name, dtype, args.peak_tflops, device)
    achieved = counts["total"] * main_run["images_per_s"]
    result: Dict[str, Any] = {
        "bench": "train",
        "params": {
            "config": args.config,
            "overrides": list(args.overrides),
            "stage": stage,
            "blocks": [j + 1 for j in blocks],
            "k": raptor.k,
            "phases": raptor.phases,
            "batch_size": int(cfg.data.batch_size),
            "steps": args.steps,
            "warmup": args.warmup,
            "precision": args.precision,
            "attn_backend": args.attn_backend,
            "compile": bool(args.compile),
            "activation_checkpointing": bool(args.activation_checkpointing),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "teacher": f"{cfg.teacher.name} (random weights), T={teacher.num_tokens}, D={teacher.embed_dim}, L={teacher.num_layers}",
            "memory": "peak CUDA memory allocated (torch.cuda.max_memory_allocated)"
            if device.type == "cuda"
            else "peak resident set of the process (VmHWM) during the timed steps",
        },
        "env": environment(device),
        "result": {
            "images_per_s": main_run["images_per_s"],
            "step_time_median_s": main_run["step_s"]["median"],
            "step_time_iqr_s": main_run["step_s"]["iqr"],
            "step_time_q1_s": main_run["step_s"]["q1"],
            "step_time_q3_s": main_run["step_s"]["q3"],
            "peak_memory_mib": main_run["peak_memory_mib"],
            "steps_with_teacher_forcing": main_run["tf_fraction"],
            "gflop_per_image_teacher_fwd": counts["teacher"] / 1e9,
            "gflop_per_image_surrogate_fwd_bwd": counts["surrogate"] / 1e9,
            "gflop_per_image_total": counts["total"] / 1e9,
            "surrogate_block_applications": counts["applications"],
            "achieved_tflop_per_s": achieved / 1e12,
            f"peak_tflop_per_s_{dtype}": None if peak is None else peak / 1e12,
            "fraction_of_peak": None if peak is None else achieved / peak,
        },
    }
    if stage == 1 and not args.skip_separate and raptor.k > 1 and cfg.train.blocks is None:
        result["stage1_separate"] = separate_runs(
            cfg, teacher, raptor, batch, device, args, main_run, counts
        )
    if not args.skip_dmd_pass:
        result["dmd_pass"] = dmd_pass_ratio(
            teacher, batch, device, args.dmd_repeats, args.dmd_compute_dtype
        )
    print_pairs("raptor bench train", {**result["params"], "device": device_name})
    print_pairs(
        "result (per optimizer step; FLOPs per image, model FLOPs: fwd+bwd = 3 x fwd)",
        result["result"],
    )
    for key, title in (
        (
            "stage1_separate",
            "stage 1: k single-block runs vs one run with all k blocks (same batch)",
        ),
        (
            "dmd_pass",
            "DMD moments pass (teacher forward + moments, all transitions) vs teacher forward",
        ),
    ):
        if key in result:
            print_pairs(title, result[key])
    return result


def peak_flops_or_none(
    device_name: str, dtype: str, override: Optional[float], device: torch.device
) -> Optional[float]:
    """The device's peak for dtype (None on CPU unless --peak-tflops is given)."""
    from raptor import flops

    if device.type != "cuda" and override is None:
        return None
    return flops.peak_flops(device_name, dtype, override)


# --------------------------------------------------------------------------- bench data

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
    shards: Path, workers: int, batch_size: int, images: int, data_config: Dict[str, Any]
) -> Dict[str, Any]:
    """One epoch of `images` through ShardDataModule's training loader with `workers`
    workers: time to the first batch, and images/s once every worker has delivered its
    first batch (the batches after the first max(W, 1))."""
    from raptor.config import load_config
    from raptor.data import ShardDataModule

    cfg = load_config(
        None,
        [
            f"data.train_urls={shards}",
            f"data.num_workers={workers}",
            f"data.batch_size={batch_size}",
            f"data.train_samples={images}",
            f"data.shuffle_buffer={min(images, 1000)}",
        ],
    )
    loader = ShardDataModule(cfg.data, data_config).train_dataloader()
    start = time.perf_counter()
    arrivals = [time.perf_counter() for _ in loader]
    skip = max(1, workers)
    if len(arrivals) <= skip:
        raise SystemExit(
            f"bench data: {len(arrivals)} batches for {workers} workers; raise --images or lower --batch-size"
        )
    steady = (len(arrivals) - skip) * batch_size / (arrivals[-1] - arrivals[skip - 1])
    return {
        "workers": workers,
        "startup_s": arrivals[0] - start,
        "images_per_s": steady,
        "images_per_s_per_worker": steady / skip,
        "epoch_s": arrivals[-1] - start,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def bench_data(args: argparse.Namespace) -> Dict[str, Any]:
    from raptor.shards import write_shards

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
            for workers in args.workers:
                row = {"shards": name, "kib_per_image": _folder_bytes(out) / args.images / 1024}
                row.update(
                    loader_throughput(out, workers, args.batch_size, args.images, data_config)
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


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from raptor.cli import add_config_arguments

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="timed training steps of stage 1 or 2 on synthetic images")
    add_config_arguments(t)
    t.add_argument("--stage", type=int, choices=[1, 2], help="default: the config's train.stage")
    t.add_argument("--batch-size", type=int, help="images per step (default: data.batch_size)")
    t.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    t.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    t.add_argument(
        "--precision", help="Lightning precision (default: bf16-mixed on GPU, 32-true on CPU)"
    )
    t.add_argument(
        "--attn-backend",
        choices=["auto", *ATTN_BACKENDS],
        default="auto",
        help="scaled_dot_product_attention backend (torch.nn.attention.sdpa_kernel)",
    )
    t.add_argument(
        "--compile", action="store_true", help="torch.compile every teacher and surrogate block"
    )
    t.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute surrogate block activations in the backward pass",
    )
    t.add_argument(
        "--max-batch",
        action="store_true",
        help="CUDA: first find the largest batch that fits (doubling from the batch size, "
        "then bisection to a multiple of 8) and bench that",
    )
    t.add_argument(
        "--peak-tflops", type=float, help="device peak to compare with (overrides the table)"
    )
    t.add_argument(
        "--skip-separate", action="store_true", help="stage 1: skip the k single-block runs"
    )
    t.add_argument("--skip-dmd-pass", action="store_true", help="skip the DMD moments-pass ratio")
    t.add_argument("--dmd-repeats", type=int, default=5, help="batches timed for the DMD ratio")
    t.add_argument(
        "--dmd-compute-dtype",
        choices=["float64", "float32"],
        default="float64",
        help="MomentAccumulator compute_dtype for the DMD ratio",
    )
    _add_common(t)

    g = sub.add_parser(
        "data", help="shard decode + transform throughput: full images vs stored crops"
    )
    g.add_argument("--images", type=int, default=512, help="synthetic images (default 512)")
    g.add_argument(
        "--image-size", default="500x375", help="WxH of the synthetic JPEGs (default 500x375)"
    )
    g.add_argument("--classes", type=int, default=4, help="class folders (default 4)")
    g.add_argument(
        "--input-size", type=int, default=224, help="transform output side (default 224)"
    )
    g.add_argument(
        "--crop-pct",
        type=float,
        default=1.0,
        help="resize side = input/crop_pct, also the stored crop side (default 1.0, DINOv2's)",
    )
    g.add_argument(
        "--interpolation", default="bicubic", help="resize interpolation (default bicubic)"
    )
    g.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    g.add_argument(
        "--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers W to try"
    )
    g.add_argument("--dir", help="keep the synthetic images and shards here (empty or new folder)")
    _add_common(g, device=False)

    d = sub.add_parser("dmd", help="streaming DMD moments and solvers: time and memory vs budget B")
    d.add_argument("--dim", type=int, default=128, help="feature width d (default 128)")
    d.add_argument("--layers", type=int, default=12, help="transitions L (default 12)")
    d.add_argument("--tokens", type=int, default=65, help="tokens per image T (default 65)")
    d.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[200, 2000],
        help="calibration budgets B in images (default 200 2000: 10x)",
    )
    d.add_argument("--batch-size", type=int, default=50, help="images per update (default 50)")
    d.add_argument(
        "--solvers", nargs="+", default=["ridge", "pcr", "rrr"], help="dmd.solvers names"
    )
    d.add_argument("--rank", type=int, default=32, help="rank for pcr/rrr (default 32)")
    d.add_argument("--alpha", type=float, default=1e-4, help="relative ridge (default 1e-4)")
    d.add_argument(
        "--compute-dtype",
        choices=["float64", "float32"],
        default="float64",
        help="dtype of the per-batch products (accumulation is always float64)",
    )
    _add_common(d)


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
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
    bench = {"train": bench_train, "dmd": bench_dmd, "data": bench_data}[args.action]
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "matmul_precision", None):
        torch.set_float32_matmul_precision(args.matmul_precision)
    result = bench(args)
    write_json(args.json, result)
    return 0
