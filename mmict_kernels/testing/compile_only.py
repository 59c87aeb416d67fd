"""Compile every Triton kernel a GPU would launch, on a machine without a GPU.

Triton's CPU interpreter checks what kernels compute, not whether they compile: it accepts
module-level Python floats inside ``@triton.jit`` (the compiler rejects them), never runs the
real bfloat16 ``tl.dot`` or the GPU tile choices. :func:`compile_only` closes that gap:

- a fake Triton driver whose target is a GPU (``GPUTarget("cuda", 90, 32)`` by default) is made
  active, so kernels compile for that GPU with Triton's own ptxas;
- every launch ``kernel[grid](...)`` becomes ``kernel.run(..., warmup=True)``: the compile runs
  with Triton's real argument specialisation (pointer alignment, integers divisible by 16 or
  equal to 1) but nothing executes, so outputs keep whatever ``torch.empty`` gave them;
- :func:`mmict_kernels.backends.simulate_gpu` makes CPU tensors stand for GPU tensors, so the
  backend registry, the host launchers (tile heuristics with 132 SMs) and the modules take
  exactly the branches they take on a GPU: the public ops and modules run unchanged.

Each compiled kernel is recorded with its launch (grid, warps, stages) and its resources, read
from Triton's bundled toolchain: the ptxas log (registers, spill stores/loads, stack frame) and
``cuobjdump -res-usage`` of the cubin, the shared memory from the kernel's metadata, and the
blocks per SM that the register file, shared memory and warp slots of an H100/H200 allow.

Run it in a process where ``TRITON_INTERPRET`` is unset (``@triton.jit`` picks the interpreter
at import time), with ``TRITON_CACHE_DIR`` pointing at a fresh folder: a kernel found in Triton's
on-disk cache skips the front end, so a compile error an earlier run got past would stay hidden.
``python -m mmict_kernels.testing.gpu_scenarios`` does all that for the production scenarios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import tempfile
from typing import Iterator

from .. import backends

# Hopper (H100 / H200, sm_90) per-SM limits, for the occupancy estimate.
H100_REGISTERS_PER_SM = 65536
H100_SHARED_PER_SM = 228 * 1024
H100_SHARED_RESERVED_PER_BLOCK = 1024
H100_MAX_WARPS_PER_SM = 64
H100_MAX_BLOCKS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256


@dataclasses.dataclass
class KernelRecord:
    """One compiled specialisation of one kernel, as first launched."""

    kernel: str
    module: str
    scenario: str
    grid: tuple
    num_warps: int
    num_stages: int
    shared_bytes: int
    constexprs: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    target: str = ""
    key: str = ""

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    def blocks_per_sm(self) -> int | None:
        """Resident blocks per H100/H200 SM allowed by registers, shared memory, warps and the block limit."""
        if self.registers is None:
            return None
        regs_per_warp = -(-self.registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        by_regs = H100_REGISTERS_PER_SM // (regs_per_warp * self.num_warps) if regs_per_warp else H100_MAX_BLOCKS_PER_SM
        by_shared = H100_SHARED_PER_SM // (self.shared_bytes + H100_SHARED_RESERVED_PER_BLOCK)
        by_warps = H100_MAX_WARPS_PER_SM // self.num_warps
        return max(0, min(by_regs, by_shared, by_warps, H100_MAX_BLOCKS_PER_SM))


@dataclasses.dataclass
class CompileLog:
    """What :func:`compile_only` saw: one record per compiled specialisation, and the errors."""

    records: list[KernelRecord] = dataclasses.field(default_factory=list)
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (scenario, message)
    launches: int = 0
    scenario: str = ""

    @contextlib.contextmanager
    def run(self, scenario: str) -> Iterator[None]:
        """Record the kernels launched inside the block under ``scenario``; an exception is recorded, not raised."""
        previous, self.scenario = self.scenario, scenario
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its scenario
            self.errors.append((scenario, f"{type(exc).__name__}: {exc}"))
        finally:
            self.scenario = previous

    def kernels_in(self, scenario_prefix: str) -> list[KernelRecord]:
        return [r for r in self.records if r.scenario.startswith(scenario_prefix)]


def _toolkit_bin(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: Triton's NVIDIA toolchain is not installed ({path} missing)")
    return path


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas_log(text: str) -> dict:
    out = {}
    if m := _PTXAS_SPILLS.search(text):
        out.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    if m := _PTXAS_REGS.search(text):
        out["registers"] = int(m.group(1))
    return out


def _cuobjdump_resources(cubin: bytes) -> dict:
    """REG and STACK of a cubin from ``cuobjdump -res-usage`` (used when no ptxas log was captured)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_toolkit_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    out = {}
    if m := re.search(r"REG:(\d+)", text):
        out["registers"] = int(m.group(1))
    if m := re.search(r"STACK:(\d+)", text):
        out["stack_bytes"] = int(m.group(1))
    return out


def _constexpr_summary(kernel) -> str:
    """The constexpr arguments of a compiled kernel, ``NAME=value`` (what makes a specialisation)."""
    src = getattr(kernel, "src", None)
    constants = getattr(src, "constants", None) or {}
    names = getattr(getattr(src, "fn", None), "arg_names", None)
    parts = []
    for key, value in sorted(constants.items(), key=lambda kv: str(kv[0])):
        index = key[0] if isinstance(key, tuple) and key else key
        name = names[index] if names is not None and isinstance(index, int) and index < len(names) else str(key)
        if name.isupper() or name.startswith(("BLOCK", "HAS_", "HEAD")):  # the meta-parameters, not specialised ints
            parts.append(f"{name}={getattr(value, 'value', value)}")
    return " ".join(parts)


class _FakeGPUDriver:
    """A Triton driver that compiles for ``target`` and launches nothing (see the module docstring)."""

    def __init__(self, target):
        self._target = target

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return divmod(self._target.arch, 10)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing runs, nothing can be timed")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("compile-only driver: no host launcher is built")


@contextlib.contextmanager
def compile_only(arch: int = 90, num_sms: int = 132, gpu_name: str = "NVIDIA H100/H200 (simulated)") -> Iterator[CompileLog]:
    """Inside the block, Triton launches compile for ``sm_<arch>`` and record into the yielded log.

    Needs a process whose Triton kernels were defined without ``TRITON_INTERPRET=1``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as driver_config
    from triton.runtime import jit

    if backends.triton_interpret():
        raise RuntimeError("compile_only: TRITON_INTERPRET=1 is set, so @triton.jit gave interpreted functions; run without it")
    target = GPUTarget("cuda", arch, 32)
    log = CompileLog()
    seen: set[str] = set()
    original_run = jit.JITFunction.run

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        log.launches += 1
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):  # the ptxas -v log Triton prints with dump_ptxas_log
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = f"{getattr(kernel.metadata, 'hash', id(kernel))}"
        if key not in seen:
            seen.add(key)
            resources = _parse_ptxas_log(captured.getvalue())
            if "registers" not in resources:
                resources = {**_cuobjdump_resources(kernel.asm["cubin"]), **resources}
            meta = kernel.metadata
            log.records.append(
                KernelRecord(
                    kernel=self.fn.__name__, module=self.fn.__module__, scenario=log.scenario,
                    grid=tuple(grid) if not callable(grid) else ("callable",), num_warps=meta.num_warps,
                    num_stages=meta.num_stages, shared_bytes=int(meta.shared), constexprs=_constexpr_summary(kernel),
                    target=f"sm_{arch}", key=key, **resources,
                )
            )  # fmt: skip
        return kernel

    previous_log_knob = triton.knobs.nvidia.dump_ptxas_log
    # DriverConfig keeps the active driver in _active (None = create the default on first use);
    # restoring it as it was also works where no real driver exists (reset_active would build one).
    previous_driver = driver_config._active
    driver_config.set_active(_FakeGPUDriver(target))
    jit.JITFunction.run = compile_instead_of_launch
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with backends.simulate_gpu(backends.SimulatedGPU(name=gpu_name, capability=divmod(arch, 10), num_sms=num_sms)):
            yield log
    finally:
        jit.JITFunction.run = original_run
        triton.knobs.nvidia.dump_ptxas_log = previous_log_knob
        driver_config._active = previous_driver


CSV_COLUMNS = (
    "scenario", "kernel", "target", "grid", "num_warps", "num_stages", "constexprs", "registers", "spill_stores",
    "spill_loads", "stack_bytes", "shared_bytes", "blocks_per_sm_h100",
)  # fmt: skip


def record_row(r: KernelRecord) -> dict:
    return {
        "scenario": r.scenario, "kernel": r.kernel, "target": r.target, "grid": "x".join(map(str, r.grid)),
        "num_warps": r.num_warps, "num_stages": r.num_stages, "constexprs": r.constexprs, "registers": r.registers,
        "spill_stores": r.spill_stores, "spill_loads": r.spill_loads, "stack_bytes": r.stack_bytes,
        "shared_bytes": r.shared_bytes, "blocks_per_sm_h100": r.blocks_per_sm(),
    }  # fmt: skip


__all__ = ["compile_only", "CompileLog", "KernelRecord", "CSV_COLUMNS", "record_row"]
