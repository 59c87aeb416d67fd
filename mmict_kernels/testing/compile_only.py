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
blocks per SM that the register file, shared memory and warp slots of the target's reference GPU
(H100/H200 for sm_90, A100 for sm_80) allow. What Triton checks only when it loads a kernel on a
device is checked here instead (:meth:`KernelRecord.launch_problems`, :func:`grid_problem`): shared
memory over the per-block limit, registers x warps that fit no SM, grid dimensions CUDA refuses.

Works with Triton 3.6 (the GPU machines' image) and 3.9 (CI); one process may compile for
several targets in turn (``compile_only(arch=90)`` then ``compile_only(arch=80)``).

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
from collections.abc import Iterator

from .. import backends


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM and per-block limits of the reference GPU of one target (for occupancy and launch checks)."""

    gpu: str
    num_sms: int
    registers_per_sm: int = 65536
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024  # the opt-in maximum Triton's launcher allows
    shared_reserved_per_block: int = 1024  # the driver keeps 1 KB per resident block
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    max_threads_per_block: int = 1024


# The reference GPU of each target: H100/H200 (sm_90, 132 SMs), A100 (sm_80, 108 SMs).
SM_LIMITS = {
    90: SMLimits(gpu="H100/H200", num_sms=132),
    80: SMLimits(gpu="A100", num_sms=108, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
}
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # blocks along x, y, z


def sm_limits(arch: int) -> SMLimits:
    """The limits of ``sm_<arch>``'s reference GPU (the sm_80 ones for other 8.x targets)."""
    return SM_LIMITS.get(arch) or SM_LIMITS[90 if arch >= 90 else 80]


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
    target: str = ""  # what the PTX was generated for, e.g. sm_90a
    arch: int = 90
    key: str = ""
    launched_in: list[str] = dataclasses.field(default_factory=list)  # every scenario that launched it (first = scenario)

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    def blocks_per_sm(self) -> int | None:
        """Resident blocks per SM of the target's reference GPU allowed by registers, shared memory, warps and the block limit."""
        if self.registers is None:
            return None
        lim = sm_limits(self.arch)
        regs_per_warp = -(-self.registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        by_regs = lim.registers_per_sm // (regs_per_warp * self.num_warps) if regs_per_warp else lim.max_blocks_per_sm
        by_shared = lim.shared_per_sm // (self.shared_bytes + lim.shared_reserved_per_block)
        by_warps = lim.max_warps_per_sm // self.num_warps
        return max(0, min(by_regs, by_shared, by_warps, lim.max_blocks_per_sm))

    def launch_problems(self) -> list[str]:
        """Why this launch would fail on the target GPU (Triton checks these only when loading the kernel
        on a device, which a compile-only run never does), and missing resource reports."""
        lim = sm_limits(self.arch)
        found = []
        if self.registers is None or self.spill_stores is None:
            found.append("no ptxas log (spills unknown): the kernel came from Triton's cache; use a fresh TRITON_CACHE_DIR")
        if self.shared_bytes > lim.shared_per_block:
            found.append(f"needs {self.shared_bytes} B of shared memory per block, {lim.gpu} allows {lim.shared_per_block}")
        if self.num_warps * 32 > lim.max_threads_per_block:
            found.append(f"{self.num_warps} warps exceed {lim.max_threads_per_block} threads per block")
        elif self.blocks_per_sm() == 0:
            found.append(
                f"cannot be resident on an SM ({self.registers} registers x {self.num_warps} warps, {self.shared_bytes} B shared)"
            )
        return found


def grid_problem(grid) -> str | None:
    """Why CUDA would refuse to launch ``grid`` (checked at every launch, not only the first of a specialisation)."""
    if callable(grid):
        return None
    for axis, (size, limit) in enumerate(zip(tuple(grid), GRID_LIMITS)):
        if isinstance(size, int) and not 0 <= size <= limit:
            return f"grid dimension {'xyz'[axis]} = {size} outside [0, {limit}] (CUDA refuses the launch)"
    return None


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
    """A Triton driver that compiles for ``target`` and launches nothing (see the module docstring).

    Its device number is the target's arch: Triton keeps one binder (holding the target it was
    made for) per device number, so two targets in one process never share compiled kernels.
    """

    def __init__(self, target):
        self._target = target

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return self._target.arch

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


_PTX_TARGET = re.compile(r"^\.target\s+(\w+)", re.MULTILINE)


@contextlib.contextmanager
def _ptxas_log_printed():
    """Make Triton print ptxas' ``-v`` log (registers, spills) while compiling.

    Triton 3.4+ has ``triton.knobs.nvidia.dump_ptxas_log``; older versions read the environment
    variable of the same name when compiling."""
    import triton

    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if knobs is not None and hasattr(knobs, "dump_ptxas_log"):
        previous = knobs.dump_ptxas_log
        knobs.dump_ptxas_log = True
        try:
            yield
        finally:
            knobs.dump_ptxas_log = previous
    else:  # pragma: no cover - Triton < 3.4
        previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
            else:
                os.environ["TRITON_DUMP_PTXAS_LOG"] = previous


@contextlib.contextmanager
def compile_only(arch: int = 90, num_sms: int | None = None, gpu_name: str | None = None) -> Iterator[CompileLog]:
    """Inside the block, Triton launches compile for ``sm_<arch>`` and record into the yielded log.

    ``num_sms`` (what the host launchers' heuristics see) defaults to the target's reference GPU:
    132 for sm_90 (H100/H200), 108 for sm_80 (A100). Needs a process whose Triton kernels were
    defined without ``TRITON_INTERPRET=1``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as driver_config
    from triton.runtime import jit

    if backends.triton_interpret():
        raise RuntimeError("compile_only: TRITON_INTERPRET=1 is set, so @triton.jit gave interpreted functions; run without it")
    limits = sm_limits(arch)
    num_sms = num_sms or limits.num_sms
    gpu_name = gpu_name or f"NVIDIA {limits.gpu} (simulated)"
    target = GPUTarget("cuda", arch, 32)
    log = CompileLog()
    seen: dict[str, KernelRecord] = {}
    original_run = jit.JITFunction.run

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        log.launches += 1
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):  # the ptxas -v log Triton prints with dump_ptxas_log
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if (why := grid_problem(grid)) is not None:
            log.errors.append((log.scenario, f"{self.fn.__name__}: {why}"))
        key = f"{arch}:{getattr(kernel.metadata, 'hash', id(kernel))}"
        if key in seen:
            if log.scenario not in seen[key].launched_in:
                seen[key].launched_in.append(log.scenario)
        else:
            resources = _parse_ptxas_log(captured.getvalue())
            ptx_target = _PTX_TARGET.search(kernel.asm.get("ptx", "") or "")
            if "registers" not in resources:  # from Triton's cache (no ptxas run): registers and stack from the cubin
                resources = {**_cuobjdump_resources(kernel.asm["cubin"]), **resources}
            meta = kernel.metadata
            seen[key] = record = KernelRecord(
                    kernel=self.fn.__name__, module=self.fn.__module__, scenario=log.scenario,
                    grid=tuple(grid) if not callable(grid) else ("callable",), num_warps=meta.num_warps,
                    num_stages=meta.num_stages, shared_bytes=int(meta.shared), constexprs=_constexpr_summary(kernel),
                target=ptx_target.group(1) if ptx_target else f"sm_{arch}", arch=arch, key=key,
                launched_in=[log.scenario], **resources,
            )  # fmt: skip
            log.records.append(record)
        return kernel

    # DriverConfig keeps the active driver in _active (None = create the default on first use);
    # restoring it as it was also works where no real driver exists (reset_active would build one).
    previous_driver = driver_config._active
    driver_config.set_active(_FakeGPUDriver(target))
    jit.JITFunction.run = compile_instead_of_launch
    try:
        with (
            _ptxas_log_printed(),
            backends.simulate_gpu(backends.SimulatedGPU(name=gpu_name, capability=divmod(arch, 10), num_sms=num_sms)),
        ):
            yield log
    finally:
        jit.JITFunction.run = original_run
        driver_config._active = previous_driver


CSV_COLUMNS = (
    "scenario", "kernel", "target", "grid", "num_warps", "num_stages", "constexprs", "registers", "spill_stores",
    "spill_loads", "stack_bytes", "shared_bytes", "blocks_per_sm", "occupancy_gpu", "launched_in",
)  # fmt: skip


def record_row(r: KernelRecord) -> dict:
    """One row of the resource table; ``blocks_per_sm`` is for ``occupancy_gpu`` (the target's reference GPU)."""
    return {
        "scenario": r.scenario, "kernel": r.kernel, "target": r.target, "grid": "x".join(map(str, r.grid)),
        "num_warps": r.num_warps, "num_stages": r.num_stages, "constexprs": r.constexprs, "registers": r.registers,
        "spill_stores": r.spill_stores, "spill_loads": r.spill_loads, "stack_bytes": r.stack_bytes,
        "shared_bytes": r.shared_bytes, "blocks_per_sm": r.blocks_per_sm(), "occupancy_gpu": sm_limits(r.arch).gpu,
        "launched_in": " ".join(r.launched_in),
    }  # fmt: skip


__all__ = [
    "compile_only",
    "CompileLog",
    "KernelRecord",
    "grid_problem",
    "SMLimits",
    "SM_LIMITS",
    "sm_limits",
    "CSV_COLUMNS",
    "record_row",
]
