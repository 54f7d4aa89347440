"""Where a run executes: device and precision from a setting, CPU threads, seeds, and this machine's matmul peak.

One place for these so no module keeps its own copy (the trainer, SFT, GRPO, eval and the benchmarks all read
them from here) and nothing hides them in globals: each caller passes the result on.
"""

from __future__ import annotations

import functools
import os
import random
import statistics
import time

import torch


def resolve_device(name: str | None) -> torch.device:
    """"auto" (or None): cuda when available, else cpu; otherwise the named device, which must exist."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use cpu (e.g. --run.device=cpu)")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. "auto": bf16 on CUDA; on a CPU `auto_cpu_precision`, the
    measured faster of fp32 and bf16 (fp32 without native bf16)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else auto_cpu_precision()
    return torch.bfloat16 if name == "bf16" else None


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product instructions
BF16_MIN_SPEEDUP = 1.1  # bf16 must beat fp32 matmuls by this much: autocast adds casts a bare matmul does not pay


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_precision(native_bf16: bool, peak) -> torch.dtype | None:
    """bf16 (autocast) when the CPU has native bf16 and its measured bf16 matmul peak beats fp32's by
    `BF16_MIN_SPEEDUP`; else None (fp32). `peak(dtype)` -> FLOP/s is only called when the flags allow bf16: an
    AVX2-only CPU keeps fp32 without measuring (its bf16 matmuls are emulated, ~50x slower). The flags alone are
    not enough: on this project's 2-core Xeon with avx512_bf16, a 1024^3 matmul ran at 151 GFLOP/s in fp32 and
    82 in bf16 (one thread)."""
    if not native_bf16:
        return None
    return torch.bfloat16 if peak(torch.bfloat16) >= BF16_MIN_SPEEDUP * peak(torch.float32) else None


def auto_cpu_precision() -> torch.dtype | None:
    """`run.precision = "auto"` on a CPU: `pick_precision` from this CPU's flags and its measured matmul peaks at
    the current thread count (n = 1024, cached per process)."""
    native = any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)
    return pick_precision(native, lambda dt: matmul_peak(torch.device("cpu"), dt, n=1024, repeats=3))


def cpu_threads(requested: int) -> int:
    """`requested`, or for 0 the cores left idle by other work (1-minute load average), at least 1.

    Why: torch's OpenMP threads wait for each other after every op; when other processes hold the cores, each
    wait costs a scheduler slice. Measured on 2 shared cores at load ~7: a `tiny` training step took 10 s with 2
    threads and 1.75 s with 1."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy + 1)))


def set_threads(device: torch.device, requested: int) -> None:
    """On a CPU, use `cpu_threads(requested)` intra-op threads; on a GPU leave torch's default."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(requested))


def seed_everything(seed: int) -> None:
    """Python's, torch's (CPU and every CUDA device) random streams from one seed."""
    random.seed(seed)
    torch.manual_seed(seed)


def device_sync(device: torch.device):
    """A function that waits for the device's queued work (a no-op on CPU): timings must include it."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_time(fn, repeats: int = 5, warmup: int = 1, sync=lambda: None) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, repeats=repeats, sync=device_sync(dev))


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of one large square matmul: the denominator of MFU on this machine, measured once per
    (device, dtype, size) in a process and cached. On a CPU without native bf16 a bf16 matmul runs ~50x slower
    than fp32, so the size there is kept small."""
    if n is None:
        n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 512)
    return _peak(str(device), dtype, n, repeats)
