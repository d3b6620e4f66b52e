"""What the `raptor bench` actions share: device choice, wall time, peak memory,
timing statistics, the environment a figure was measured on, the device's peak
FLOP/s, and printing tables or writing JSON.

Peak memory is the CUDA allocator's high-water mark above the memory in use when
the measured work starts (`torch.cuda.max_memory_allocated`), or on CPU the
process's resident-set high-water mark above the resident set at start (Linux
VmHWM, reset through /proc/self/clear_refs). For its CPU figures to follow the
live tensors, `bench dmd` makes glibc serve every block of 256 KiB or more with
mmap (`release_freed_memory`), so a freed tensor leaves the resident set at
once; with glibc's default, freed blocks stay resident and the high-water mark
also measures heap fragmentation (seen here: 56 vs 98 MiB for the same work).
`bench train` leaves the allocator alone (its timings are those of a normal run),
so its CPU peak includes what the allocator keeps.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

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
    q1, median, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1}


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
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _loadavg() -> tuple:
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
    """`key : value` lines, keys padded to one width."""
    print(f"\n{title}")
    width = max(len(k) for k in pairs)
    for k, v in pairs.items():
        print(f"  {k.ljust(width)} : {_fmt(v)}")


def write_json(path: Optional[str], result: Dict[str, Any]) -> None:
    """Write `result` to `path` (indented JSON, parent folders made); nothing if no path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")


def to_mib(nbytes: Optional[int]) -> Optional[float]:
    """Bytes -> MiB, None kept."""
    return None if nbytes is None else nbytes / MiB


# --------------------------------------------------------------------------- peaks


def peak_dtype(precision: str) -> str:
    """The peak column that bounds a Lightning precision: tensor-core bf16/fp16 for mixed
    or half precision, else tf32 when float32 matmuls may use TF32, else fp32."""
    if precision.startswith(("bf16", "16")):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops_or_none(
    device_name: str, dtype: str, override: Optional[float], device: torch.device
) -> Optional[float]:
    """The device's peak for dtype (None on CPU unless --peak-tflops is given)."""
    from raptor.bench import flops

    if device.type != "cuda" and override is None:
        return None
    return flops.peak_flops(device_name, dtype, override)
