"""What a train step costs (median time, memory kept for the backward) and which machine measured it."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

from .methods import Stepper


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedTensorBytes:
    """Bytes of the distinct tensor storages autograd saves for the backward (the activations).

    On a CPU there is no allocator peak to read, so this is the train step's memory measure
    there: parameters, gradients and optimizer state are left out (they are the same for
    MMICT, Vanilla ICT and VanillaFine-Tune), what grows with the context is counted.
    """

    def __init__(self, model):
        self.exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.exclude:
                self.seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a wrapper subclass)
            pass
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def measure_step(stepper: Stepper, steps: int) -> dict:
    """Median train step time (ms, the first step not counted) and the memory of one step."""
    device = stepper.trainer.device
    torch.manual_seed(stepper.trainer.cfg.train.seed)
    times, cpu_times = [], []
    for s in range(steps - 1):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        stepper(s)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        stepper(steps - 1)
        mem, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        probe = SavedTensorBytes(stepper.model)
        with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
            stepper(steps - 1)
        mem, kind = probe.total, "cpu: tensors saved for backward"
    # Wall time is what a user waits; CPU time (all threads of this process) is what a step costs
    # when other processes share the cores (wall time then mostly measures them).
    return {
        "step_ms": 1000 * statistics.median(times[1:] or times),
        "step_cpu_ms": 1000 * statistics.median(cpu_times[1:] or cpu_times),
        "mem_mb": mem / 2**20,
        "mem_kind": kind,
    }


def machine(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
    }
