"""Which process this is among a job's ranks, however the job was started.

One answer for every launcher: an initialised `torch.distributed` process group (Lightning
DDP, `raptor dmd`) wins; before or without one the launcher's environment is read:
torchrun sets RANK / LOCAL_RANK / WORLD_SIZE, `srun` sets SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS, Lightning's own launcher sets LOCAL_RANK / NODE_RANK / WORLD_SIZE in the
processes it starts. RANK comes before SLURM_PROCID, so torchrun inside a SLURM allocation
(where every process inherits the batch shell's SLURM_PROCID=0) is read correctly.
A Lightning Trainer, when there is one, knows best (`rank_and_world(trainer)`).
Also here: the device a process computes on (`device`), the world size a Trainer will
have, from its config, before it exists (`planned_world_size`), and a process group for
the commands that use several ranks without a Trainer (`join_process_group`, `barrier`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def initialised() -> bool:
    """Whether a default torch.distributed process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """This process's rank in the job (0 when it runs alone).

    Without a process group and without RANK / SLURM_PROCID (Lightning's own launcher),
    the rank is LOCAL_RANK on node NODE_RANK with LOCAL_WORLD_SIZE processes per node;
    when that size is unknown, a process on a node > 0 gets a nonzero placeholder."""
    if initialised():
        return dist.get_rank()
    env = os.environ
    for var in ("RANK", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    local, node = int(env.get("LOCAL_RANK", 0)), int(env.get("NODE_RANK", 0))
    return node * int(env.get("LOCAL_WORLD_SIZE", local + 1)) + local


def local_rank() -> int:
    """This process's index on its machine (selects its GPU)."""
    env = os.environ
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def world_size() -> int:
    """Number of processes in the job (1 when it runs alone)."""
    if initialised():
        return dist.get_world_size()
    env = os.environ
    srun = "RANK" not in env and "SLURM_PROCID" in env  # the same source as global_rank()
    value = env.get("SLURM_NTASKS" if srun else "WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def rank_and_world(trainer: Optional[Any] = None) -> tuple[int, int]:
    """(global rank, world size): the Trainer's when given, else as above."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    return global_rank(), world_size()


def planned_world_size(devices: Any, num_nodes: int = 1) -> int:
    """The world size a Trainer given `devices` (a count, a list of device ids, or e.g.
    "auto": every GPU here, else 1) and `num_nodes` will have."""
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        count = devices
    elif isinstance(devices, Sequence) and not isinstance(devices, str):
        count = len(devices)
    else:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return count * int(num_nodes)


def uses_gpu(accelerator: str = "auto") -> bool:
    """Whether a run asking for `accelerator` (auto, gpu, cuda, cpu) computes on a GPU here."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def device(accelerator: str = "auto") -> torch.device:
    """This process's device for `accelerator`: its local rank's GPU, else the CPU."""
    return torch.device("cuda", local_rank()) if uses_gpu(accelerator) else torch.device("cpu")


def is_rank_zero() -> bool:
    """True on the one process that prints results and writes shared files."""
    return global_rank() == 0


def join_process_group(accelerator: str = "auto") -> None:
    """Start the default process group for a command started by torchrun (WORLD_SIZE > 1)
    that has none yet: NCCL on GPUs, gloo on CPUs. It is kept for the process's life (a
    pipeline's later steps use it; a group destroyed and made again in one process loses
    its peers) and destroyed at exit. Nothing otherwise (one process, or a group already
    there: Lightning's, an earlier step's)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or initialised():
        return
    if uses_gpu(accelerator):
        torch.cuda.set_device(device(accelerator))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(lambda: initialised() and dist.destroy_process_group())


def barrier() -> None:
    """Wait for every rank (a no-op without a process group of several ranks)."""
    if initialised() and dist.get_world_size() > 1:
        dist.barrier()


def rank_zero_first(work: Callable[[], T]) -> T:
    """`work()` on rank 0, then, once it is done, on every other rank: for work that
    writes shared files the first time and finds them afterwards."""
    if global_rank() == 0:
        out = work()
        barrier()
        return out
    barrier()
    return work()


def all_max(value: int, device: torch.device | str = "cpu") -> int:
    """The largest `value` over all ranks: one all-reduce that every rank must call
    (`device`: where the process group's backend wants the tensor, cuda for NCCL)."""
    if not initialised() or dist.get_world_size() == 1:
        return int(value)
    flag = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


__all__ = [
    "all_max",
    "barrier",
    "device",
    "global_rank",
    "initialised",
    "is_rank_zero",
    "join_process_group",
    "local_rank",
    "planned_world_size",
    "rank_and_world",
    "rank_zero_first",
    "uses_gpu",
    "world_size",
]
