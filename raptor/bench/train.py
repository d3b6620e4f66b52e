"""`raptor bench train CONFIG [k=v ...]`: timed optimizer steps of the real stage-1
or stage-2 Lightning module on synthetic images, with a teacher of random weights
(throughput does not depend on weight values). Prints images/s, step time (median,
IQR), peak memory, FLOPs per image (`raptor.bench.flops`), achieved FLOP/s and its
fraction of the device's peak; for stage 1 also the per-image cost of k
single-block runs over one run with all k blocks, and the cost of a DMD moments
pass over the teacher's forward alone, both measured in the run. `--max-batch`
(CUDA) first searches the largest batch that fits (`largest_fitting`).

Every figure comes with its ratio to a reference-style baseline measured in the same
run (`reference_style`): the same step computed the way the reference's code computes
it, float32 throughout (no autocast, no TF32) and explicit softmax attention with the
weights materialised (`nn.MultiheadAttention(need_weights=True)` in the surrogate, as
the reference's `Block`; timm's non-fused attention in the teacher). The measured run
and the baseline alternate for `--baseline-rounds` rounds; figures are medians.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from raptor.bench.common import (
    PeakMemory,
    Stopwatch,
    environment,
    peak_dtype,
    peak_flops_or_none,
    print_pairs,
    resolve_device,
    result_device_name,
    spread,
    to_mib,
)
from raptor.model.partition import Partition
from raptor.model.raptor import Raptor
from raptor.model.teacher import Teacher
from raptor.train.fit import Distiller, selected_blocks
from raptor.train.runs import default_precision, make_trainer
from raptor.train.schedules import stage_config, tf_ratio

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
    """Random normalized images at the teacher's input size, in the batch format of raptor.data.stream."""
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
    cfg.teacher.init = "random"
    cfg.train.init_from = ""
    if args.stage is not None:
        cfg.train.stage = args.stage
    if args.batch_size is not None:
        cfg.data.batch_size = args.batch_size
    return cfg


def build_models(cfg, device: torch.device, args: argparse.Namespace):
    """Teacher (random weights) and Raptor on `device`, with activation checkpointing applied."""
    teacher = Teacher.from_config(cfg.teacher)
    if cfg.phases.boundaries is None and not cfg.phases.file:
        even = Partition.even(teacher.num_layers, int(cfg.model.k))
        cfg.phases.boundaries = list(even.boundaries)
    raptor = Raptor.from_config(cfg.model, teacher, Partition.from_config(cfg, teacher.num_layers))
    teacher.to(device)
    raptor.to(device)
    for block in raptor.blocks:
        block.checkpoint_activations = bool(args.activation_checkpointing)
    return teacher, raptor


def compile_blocks(teacher, raptor, backend: str = "inductor") -> None:
    """torch.compile every teacher and surrogate block in place."""
    for block in list(raptor.blocks) + list(teacher.vit.blocks):
        block.compile(backend=backend)


class ReferenceAttention(nn.Module):
    """The reference's attention: `nn.MultiheadAttention` called with need_weights=True
    (its default in the reference's Block), i.e. explicit softmax(QK^T / sqrt(d)) V per
    head with the head-averaged weights materialised, holding a copy of a Raptor
    `SelfAttention`'s weights (same [q; k; v] layout and head split, so the same
    function)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        weight = attn.qkv.weight
        self.mha = nn.MultiheadAttention(
            weight.shape[1],
            attn.num_heads,
            batch_first=True,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            self.mha.in_proj_weight.copy_(weight)
            if attn.qkv.bias is None:
                self.mha.in_proj_bias.zero_()
            else:
                self.mha.in_proj_bias.copy_(attn.qkv.bias)
            self.mha.out_proj.weight.copy_(attn.proj.weight)
            self.mha.out_proj.bias.copy_(attn.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=True)[0]


def reference_style(teacher, raptor):
    """Copies of the teacher and surrogate computed as the reference does (module
    docstring): the teacher in float32 with timm's explicit attention, every surrogate
    attention a `ReferenceAttention`, no activation checkpointing."""
    import copy

    ref_teacher, ref_raptor = copy.deepcopy(teacher), copy.deepcopy(raptor)
    ref_teacher.precision = "fp32"
    for block in ref_teacher.vit.blocks:
        if hasattr(block.attn, "fused_attn"):
            block.attn.fused_attn = False
    for block in ref_raptor.blocks:
        block.attn = ReferenceAttention(block.attn)
        block.checkpoint_activations = False
    return ref_teacher, ref_raptor


@contextmanager
def float32_matmuls() -> Iterator[None]:
    """float32 matrix products and convolutions without TF32 (restored on exit)."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


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

    B = batch["image"].shape[0]
    module = Distiller(cfg, teacher, raptor, blocks, global_batch=B)  # one device
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
    times = timer.step_seconds
    timed = range(args.warmup, total)
    tf_steps = (
        sum(tf_ratio(s, module.anneal_steps, module.teacher_forcing) > 0 for s in timed)
        if module.stage == 1
        else 0
    )
    return {
        "images_per_s": len(times) * B / timer.wall,
        "step_times": times,
        "step_s": spread(times),
        "peak_memory_mib": to_mib(timer.memory.total),
        "tf_fraction": tf_steps / len(timed),
    }


def interleaved_runs(cfg, teacher, raptor, reference, blocks, batch, device, args):
    """`args.baseline_rounds` rounds of (the measured run, then the reference-style run
    when `reference` is given, at --baseline-batch or the same batch): two lists of
    `timed_run` results. One round when there is no baseline."""
    rounds = max(1, int(args.baseline_rounds)) if reference is not None else 1
    size = args.baseline_batch or batch["image"].shape[0]
    ref_batch = batch if size == batch["image"].shape[0] else synthetic_batch(teacher, size, device)
    ref_args = argparse.Namespace(**{**vars(args), "precision": "32-true", "attn_backend": "auto"})
    runs, reference_runs = [], []
    for _ in range(rounds):
        runs.append(timed_run(cfg, teacher, raptor, blocks, batch, device, args))
        if reference is not None:
            with float32_matmuls():
                reference_runs.append(
                    timed_run(cfg, *reference, blocks, ref_batch, device, ref_args)
                )
    return runs, reference_runs


def median_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Rounds of one kind combined: median images/s and peak memory, the step-time
    spread over every timed step of every round."""
    import statistics

    memory = [r["peak_memory_mib"] for r in runs if r["peak_memory_mib"] is not None]
    times = [t for r in runs for t in r["step_times"]]
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in runs),
        "step_times": times,
        "step_s": spread(times),
        "peak_memory_mib": statistics.median(memory) if memory else None,
        "tf_fraction": runs[0]["tf_fraction"],
    }


def baseline_ratios(
    main, base, runs, reference_runs, flops_per_image, batch_size
) -> Dict[str, Any]:
    """Each figure of the measured run next to the reference-style baseline's and their
    ratio (this / baseline; images/s > 1 = faster), plus the per-round speed-ups."""
    figures = {
        "images_per_s": (main["images_per_s"], base["images_per_s"]),
        "step_time_median_s": (main["step_s"]["median"], base["step_s"]["median"]),
        "achieved_tflop_per_s": (
            flops_per_image * main["images_per_s"] / 1e12,
            flops_per_image * base["images_per_s"] / 1e12,
        ),
        "peak_memory_mib": (main["peak_memory_mib"], base["peak_memory_mib"]),
    }
    out: Dict[str, Any] = {
        "baseline_batch_size": batch_size,
        "baseline_precision": "32-true, float32 matmuls (no TF32)",
    }
    for name, (this, ref) in figures.items():
        out[f"{name}_this"], out[f"{name}_baseline"] = this, ref
        out[f"{name}_ratio"] = None if this is None or not ref else this / ref
    out["speedup_per_round"] = [
        a["images_per_s"] / b["images_per_s"] for a, b in zip(runs, reference_runs)
    ]
    return out


def step_flops(
    cfg, teacher, raptor, blocks: Optional[List[int]], tf_fraction: float
) -> Dict[str, float]:
    """Model FLOPs per image of one step (`raptor.bench.flops`), averaged over the timed steps;
    in stage 1 a fraction `tf_fraction` of them ran the teacher-forcing pass."""
    from raptor.bench import flops

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


def largest_fitting(
    fits: Callable[[int], bool], start: int, multiple: int = 8, limit: Optional[int] = None
) -> int:
    """The largest batch b <= limit (a multiple of `multiple`, or `start`) with fits(b),
    assuming fits is monotone: doubling from `start` (never past `limit`), then
    bisection. 0 if not even `start` fits."""
    if not fits(start):
        return 0
    lo, hi = start, 2 * start
    while limit is None or hi <= limit:
        if not fits(hi):
            break
        lo, hi = hi, 2 * hi
    else:  # the next doubling would pass the limit: bisect up to the limit itself
        hi = (limit // multiple + 1) * multiple
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

    found = largest_fitting(fits, int(cfg.data.batch_size), limit=args.max_batch_limit)
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
    from raptor.bench import flops

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


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = resolve_device(args.device)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if args.baseline_rounds < 1 or (args.baseline_batch is not None and args.baseline_batch < 1):
        raise SystemExit("--baseline-rounds and --baseline-batch must be >= 1")
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
    reference = None if args.skip_baseline else reference_style(teacher, raptor)
    if args.compile:
        compile_blocks(teacher, raptor, args.compile_backend)
    stage = int(cfg.train.stage)
    blocks = selected_blocks(cfg, raptor.k)
    if args.max_batch:
        cfg.data.batch_size = max_batch(cfg, teacher, raptor, blocks, device, args)
    batch = synthetic_batch(teacher, int(cfg.data.batch_size), device)

    runs, reference_runs = interleaved_runs(
        cfg, teacher, raptor, reference, blocks, batch, device, args
    )
    main_run = median_run(runs)
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
            "compile": bool(args.compile) and args.compile_backend,
            "rounds": len(runs),
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
    if reference_runs:
        result["baseline"] = baseline_ratios(
            main_run,
            median_run(reference_runs),
            runs,
            reference_runs,
            counts["total"],
            args.baseline_batch or int(cfg.data.batch_size),
        )
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
            "baseline",
            "this run vs the reference-style baseline (float32, explicit softmax attention "
            "with weights materialised), interleaved rounds, medians; ratio = this / baseline",
        ),
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
