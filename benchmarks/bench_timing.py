"""Timing, memory and roofline floors for bench_hub.py (no knowledge of any op).

GPU: every repetition is bracketed by its own pair of CUDA events (as
``triton.testing.do_bench`` does), after a time-boxed warm-up; we keep the whole
distribution and report the median and the 20th / 80th percentiles. Each repetition
uses the next of several input sets, and the sets together are larger than the L2
cache, so no repetition reads what the previous one left in L2.

CPU: the same loop with ``time.perf_counter`` (wall clock); numbers are labelled CPU.

Floors are measured in the same process, right before the rows: a device-to-device
copy (bytes read + written per second) and a square matmul in the benchmark's dtype
(FLOP/s). A row's floor is max(bytes / bandwidth, FLOPs / matmul rate).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), percentile(s, 0.2), percentile(s, 0.8), len(s))


def rotation_count(bytes_per_set: float, device: torch.device, cap: int = 64) -> int:
    """How many input sets to rotate through so that together they exceed 2x the L2 cache."""
    if device.type != "cuda":
        return 1  # wall-clock CPU timing: caches are not the question there
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(2, min(cap, math.ceil(2 * l2 / max(bytes_per_set, 1.0))))


def bench(
    fn: Callable[[int], object],
    n_sets: int,
    device: torch.device,
    *,
    warmup_ms: float,
    rep_ms: float,
    min_reps: int,
    max_reps: int,
    before_each: Callable[[int], None] | None = None,
    untimed_first: bool = True,
) -> Timing:
    """Time ``fn(i)`` (i = input-set index, rotated) and return median / p20 / p80 in ms.

    ``before_each(i)`` runs outside the timed region (e.g. to drop accumulated .grad).
    The number of repetitions is chosen from a first estimate to fill ``rep_ms``.
    """
    cuda = device.type == "cuda"

    def run_once(i: int) -> float:
        if before_each is not None:
            before_each(i % n_sets)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % n_sets)
            end.record()
            return (start, end)  # resolved after one synchronize at the end
        t0 = time.perf_counter()
        fn(i % n_sets)
        return (time.perf_counter() - t0) * 1e3

    # Warm-up (compilation, autotuning, allocator) and a first estimate of one call's time.
    # The first call is not timed (unless ``untimed_first`` is False: then it is the first
    # repetition, for CPU runs where a call takes seconds and nothing compiles); then calls
    # continue until ``warmup_ms`` has passed.
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    raw = []
    if untimed_first:
        if before_each is not None:
            before_each(0)
        t0 = time.perf_counter()
        fn(0)
        sync()
        estimate_ms = (time.perf_counter() - t0) * 1e3
    else:
        raw.append(run_once(0))
        sync()
        estimate_ms = raw[0] if not cuda else raw[0][0].elapsed_time(raw[0][1])
    t0, done = time.perf_counter(), 0
    while (time.perf_counter() - t0) * 1e3 < warmup_ms and done < max_reps:
        run_once(done)
        sync()
        done += 1
    if done:
        estimate_ms = (time.perf_counter() - t0) * 1e3 / done
    reps = int(min(max_reps, max(min_reps, rep_ms / max(estimate_ms, 1e-3))))

    raw += [run_once(len(raw) + i) for i in range(reps - len(raw))]
    sync()
    times = [s.elapsed_time(e) for s, e in raw] if cuda else raw
    return summarize(times)


def peak_extra_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by one call of ``fn`` above what was allocated before it (MB).

    CUDA caching-allocator statistics; None on CPU, where torch keeps no such statistics.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


# ---------------------------------------------------------------------------------------
# Floors: measured copy bandwidth and matmul rate
# ---------------------------------------------------------------------------------------
class _FlopCount(torch.utils._python_dispatch.TorchDispatchMode):
    """torch's own FLOP formulas (``flop_counter.flop_registry``, what FlopCounterMode applies) summed
    over every op that runs, without FlopCounterMode's module tracker: that asserts on some no-grad
    graphs ("Expected gradient function to be set", the prefix-cache generate path)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.total = flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = self.registry.get(func._overloadpacket)
        if formula is None:
            # A composite op (aten.linear under inference_mode) reaches the mode whole: run its
            # decomposition inside the mode so its matmuls come through, as FlopCounterMode does.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` by torch's FLOP formulas (FlopCounterMode's totals, on any graph)."""
    with _FlopCount() as counter:
        fn()
    return float(counter.total)


@dataclasses.dataclass
class Floors:
    bandwidth_bytes_per_s: float  # bytes read + written per second by a large copy
    matmul_flops_per_s: float  # dense matmul rate in the benchmark dtype
    copy_bytes: int
    matmul_n: int

    def floor_ms(self, flops: float, bytes_moved: float) -> tuple[float, float]:
        """(bytes / bandwidth, FLOPs / matmul rate) in milliseconds."""
        return bytes_moved / self.bandwidth_bytes_per_s * 1e3, flops / self.matmul_flops_per_s * 1e3


def measure_floors(device: torch.device, dtype: torch.dtype, quick: bool) -> Floors:
    if device.type == "cuda":
        copy_elems, n = (2**27, 4096) if quick else (2**28, 8192)  # 256 / 512 MiB in bf16; 8192^3 matmul
        warm, rep = (20.0, 100.0) if quick else (50.0, 300.0)
    else:
        copy_elems, n = (2**22, 256) if quick else (2**24, 1024)
        warm, rep = (5.0, 50.0) if quick else (20.0, 300.0)
    copy_ms, copy_bytes = _time_copy(copy_elems, dtype, device, warm, rep)
    mm_ms = _time_matmul(n, dtype, device, warm, rep)
    return Floors(copy_bytes / (copy_ms * 1e-3), 2 * n**3 / (mm_ms * 1e-3), copy_bytes, n)


def _time_copy(elems: int, dtype, device, warm: float, rep: float) -> tuple[float, int]:
    """Median ms of ``dst.copy_(src)`` and the bytes it moves (read + write); buffers freed on return."""
    src = torch.empty(elems, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    timing = bench(lambda i: dst.copy_(src), 1, device, warmup_ms=warm, rep_ms=rep, min_reps=3, max_reps=200)
    return timing.median_ms, 2 * src.numel() * src.element_size()


def _time_matmul(n: int, dtype, device, warm: float, rep: float) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return bench(lambda i: a @ b, 1, device, warmup_ms=warm, rep_ms=rep, min_reps=3, max_reps=200).median_ms


# ---------------------------------------------------------------------------------------
# What the CSV says about the machine and the code
# ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def git_commit(root: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, root: str) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the machine
        triton_version = "not installed"
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(root),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
