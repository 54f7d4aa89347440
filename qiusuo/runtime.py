"""Where a run executes: device and precision from a setting, CPU threads, seeds, and this machine's matmul peak.

One place for these so no module keeps its own copy (the trainer, SFT, GRPO, eval and the benchmarks all read
them from here) and nothing hides them in globals: each caller passes the result on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

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
    """The training compute dtype (bf16), or None for plain fp32 (`precision_choice` without its record)."""
    return precision_choice(name, device)[0]


def precision_choice(name: str, device: torch.device) -> tuple[torch.dtype | None, dict]:
    """(bf16 or None for fp32, a record of the choice for the run's log: `setting`, `precision`, `why`, and on a
    CPU under "auto" `native_bf16` and the measured `peak_fp32` / `peak_bf16` in GFLOP/s, None where not measured).
    "auto": bf16 on CUDA; on a CPU the measured faster of fp32 and bf16 (`pick_precision`; fp32 without native
    bf16, unmeasured)."""
    record = {"setting": name}
    if name != "auto":
        dtype = torch.bfloat16 if name == "bf16" else None
        why = f"run.precision={name}"
    elif device.type == "cuda":
        dtype, why = torch.bfloat16, "auto on CUDA"
    else:
        native = any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)
        peaks = {}

        def peak(dt: torch.dtype) -> float:
            peaks[dt] = matmul_peak(torch.device("cpu"), dt, n=1024, repeats=3)
            return peaks[dt]

        dtype = pick_precision(native, peak)
        gflops = {k: round(peaks[dt] / 1e9, 1) if dt in peaks else None
                  for k, dt in (("peak_fp32", torch.float32), ("peak_bf16", torch.bfloat16))}
        record.update(native_bf16=native, **gflops)
        why = ("auto: no avx512_bf16/amx_bf16 flag, bf16 matmuls are emulated" if not native else
               f"auto: bf16 matmuls {gflops['peak_bf16']} vs fp32 {gflops['peak_fp32']} GFLOP/s "
               f"(bf16 needs {BF16_MIN_SPEEDUP}x)")
    record.update(precision="bf16" if dtype is not None else "fp32", why=why)
    return dtype, record


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product instructions
# bf16 must beat fp32 matmuls by this much: only the matmuls speed up (on the demo ~60% of a step; norms, softmax,
# dispatch and the optimizer do not), so a matmul speedup s gives a step 1 / (0.4 + 0.6 / s): 1.25x at s = 1.5,
# 1.06x at 1.1, which the casts bf16 training still makes can eat
BF16_MIN_SPEEDUP = 1.5


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
    """bf16 when the CPU has native bf16 and its measured bf16 matmul peak beats fp32's by `BF16_MIN_SPEEDUP`; else
    None (fp32). `peak(dtype)` -> FLOP/s is only called when the flags allow bf16: an AVX2-only CPU keeps fp32
    without measuring (its bf16 matmuls are emulated, ~50x slower). The flags alone are not enough: on this
    project's 2-core Xeon with avx512_bf16, a 1024^3 matmul ran at 151 GFLOP/s in fp32 and 82 in bf16 (one
    thread)."""
    if not native_bf16:
        return None
    return torch.bfloat16 if peak(torch.bfloat16) >= BF16_MIN_SPEEDUP * peak(torch.float32) else None


def proc_stat() -> dict[int, list[int]]:
    """Per-CPU time counters from /proc/stat: {cpu: [user, nice, system, idle, iowait, ...]}."""
    with open("/proc/stat") as f:
        return {int(line[3:].split()[0]): [int(x) for x in line.split()[1:]]
                for line in f if line[:3] == "cpu" and line[3] != " "}


def free_cores(interval: float = 0.2, sample=None) -> tuple[int, int, float]:
    """(cores this process may use, of them free now, cores other processes kept busy) from two `sample`s of the
    CPU time counters `interval` seconds apart: time spent outside idle, less this process's own and, when this
    process is not niced itself, less niced processes' (they give way to us: a background job at nice 19 gets ~1.5%
    of a core we compete for). Not the load
    average: it trails by a minute, so right after a busy stage (the demo's own corpus preparation, or a neighbour
    that has just exited) it still counted cores that were idle again. Not Linux: every core, none busy."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = len(allowed) if allowed is not None else (os.cpu_count() or 1)
    sample = sample or proc_stat
    niced_yield = not hasattr(os, "nice") or os.nice(0) <= 0  # niced ourselves: other niced work competes equally
    try:
        t0, a = os.times(), sample()
        time.sleep(interval)
        t1, b = os.times(), sample()
    except (OSError, ValueError, IndexError):
        return cores, cores, 0.0
    busy = 0.0
    for cpu in allowed if allowed is not None else a:
        x, y = a.get(cpu), b.get(cpu)
        if x and y:  # busy share of the interval = 1 - (idle + iowait [+ nice]) / all
            yields = y[1] - x[1] if niced_yield else 0  # niced processes' time: they give way to an un-niced us
            busy += 1 - (yields + y[3] + y[4] - x[3] - x[4]) / max(sum(y) - sum(x), 1)
    own = (t1.user + t1.system - t0.user - t0.system) / max(t1.elapsed - t0.elapsed, 1e-9)
    others = max(0.0, busy - own)
    return cores, max(1, min(cores, int(cores - others + 0.5))), others


def cpu_threads(requested: int) -> tuple[int, str]:
    """(threads, why): `requested`, or for 0 the cores other processes leave free now (`free_cores`), at least 1.

    Why not always every core: torch's OpenMP threads wait for each other after every op; when other processes
    hold the cores, each wait costs a scheduler slice. Measured on 2 shared cores at load ~7: a `tiny` training
    step took 10 s with 2 threads and 1.75 s with 1."""
    if requested > 0:
        return requested, f"{requested} threads (--threads {requested})"
    cores, free, others = free_cores()
    why = f"{free} threads: {cores} cores, {others:.1f} busy with other work (choose with --threads N)"
    return free, why


def set_threads(device: torch.device, requested: int, announce: bool = True) -> int:
    """On a CPU, use `cpu_threads(requested)` intra-op threads and say so on stderr (once per command that
    computes; `announce`); on a GPU leave torch's default. Returns the CPU thread count (0 on a GPU)."""
    if device.type != "cpu":
        return 0
    n, why = cpu_threads(requested)
    torch.set_num_threads(n)
    if announce:
        print(f"cpu: {why}", file=sys.stderr)
    return n


class Interrupted(Exception):
    """Ctrl-C stopped a run at a clean point (between optimizer steps); the message says what was kept and how to
    go on. Commands print it as their one line and exit with 130, the shell's code for Ctrl-C."""


class StopRequest:
    """Set by the first Ctrl-C inside `stop_on_interrupt`; a loop reads `requested` at its clean points."""

    def __init__(self):
        self.requested = False


@contextlib.contextmanager
def stop_on_interrupt(what: str = "step"):
    """Within: the first Ctrl-C (SIGINT) only sets `StopRequest.requested` and says so, so the loop finishes its
    current `what` and stops where its state is whole (a checkpoint taken there resumes exactly); a second Ctrl-C
    raises KeyboardInterrupt at once. Outside the main thread signals cannot be caught: nothing changes there.

    Why not catch KeyboardInterrupt: it lands anywhere, e.g. after the batches of a step were drawn and before the
    optimizer stepped, and a checkpoint taken then skipped a batch on resume."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print(f"\nCtrl-C: stopping after this {what} (press it again to stop at once, keeping nothing)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def cache_dir() -> Path:
    """Where qiusuo keeps what it builds for this machine (compiled kernels, memory-mapped expert banks):
    `$QIUSUO_CACHE`, else `$XDG_CACHE_HOME/qiusuo`, else `~/.cache/qiusuo`."""
    if os.environ.get("QIUSUO_CACHE"):
        return Path(os.environ["QIUSUO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qiusuo"


def max_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux's VmHWM; 0 where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


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
