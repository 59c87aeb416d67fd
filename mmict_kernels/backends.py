"""Backend registry: which implementation (cuda, triton, torch) runs an op, and why.

This module is the one source of backend facts: the backend names (:data:`BACKENDS`,
:data:`BACKEND_CHOICES`), what each backend's kernels support (:data:`TRITON_ATTENTION`,
:data:`CUDA_ATTENTION`, ...: the kernels' own checks read these), the environment each needs
(Triton importable, the CUDA extension built for this GPU's architecture), and the choice.

Every op registers one implementation per backend with its :class:`Capabilities`.
``backend="auto"`` picks the first usable one in the order cuda -> triton -> torch (on a CPU,
auto means the reference: the Triton interpreter is for tests); an explicit request for a
backend that cannot run raises :class:`BackendUnavailableError` with every reason it was refused.
Modules (FusedMHub, the prefix cache, the driver) call ops through :func:`module_choice`, where
``"cuda"`` means "the CUDA kernel where the op has one that runs these inputs, else auto's choice".

The decision only looks at static facts (device type, dtype, head dim, flags), so it is made
once at trace time under ``torch.compile`` and never syncs.

:func:`simulate_gpu` makes CPU tensors stand for CUDA ones (the compile-only harness of
``mmict_kernels.testing``): the registry and the kernel launchers then take their GPU branches,
so every kernel a GPU would launch is compiled for the GPU target, on a machine without one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import torch

BACKENDS = ("cuda", "triton", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS  # what a ``backend=`` argument or config key accepts
_AUTO_ORDER = BACKENDS


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs (the message says why)."""


def check_backend_name(backend, name: str = "backend") -> str:
    """``backend`` if it is one of :data:`BACKEND_CHOICES`; else a TypeError/ValueError naming ``name``."""
    choices = ", ".join(repr(b) for b in BACKEND_CHOICES)
    if not isinstance(backend, str):
        raise TypeError(f"{name}: expected a str ({choices}), got {type(backend).__name__}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"{name}: expected one of {choices}, got {backend!r}")
    return backend


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one backend's implementation of one op can do."""

    dtypes: frozenset = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    head_dims: frozenset | None = None  # None: any head dim
    dropout: bool = True  # attention-probability dropout in training
    devices: frozenset = frozenset({"cpu", "cuda"})


# What the kernels of each backend support. The ops register these, and the kernels' own
# argument checks read them, so a support set is written once.
REFERENCE = Capabilities()
TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
TRITON_ATTENTION = Capabilities(dtypes=TRITON_DTYPES, head_dims=frozenset({32, 64, 128}))
TRITON_ELEMENTWISE = Capabilities(dtypes=TRITON_DTYPES)  # the fused epilogues: any hidden size
CUDA_ATTENTION = Capabilities(
    dtypes=frozenset({torch.float16, torch.bfloat16}), head_dims=frozenset({64, 128}), dropout=False, devices=frozenset({"cuda"})
)


def without_dropout(caps: Capabilities) -> Capabilities:
    return dataclasses.replace(caps, dropout=False)


@dataclasses.dataclass
class _Entry:
    loader: Callable[[], Callable]  # imports lazily and returns the implementation
    module: str
    attr: str
    caps: Capabilities
    environment: Callable[[str], str | None]  # device type -> reason it cannot run, or None


_REGISTRY: dict[str, dict[str, _Entry]] = {}


# ---------------------------------------------------------------------------------------
# A simulated GPU (compile-only harness): CPU tensors stand for this GPU's tensors
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SimulatedGPU:
    name: str = "NVIDIA H100/H200 (simulated)"
    capability: tuple[int, int] = (9, 0)
    num_sms: int = 132


_SIMULATED: SimulatedGPU | None = None


def simulated_gpu() -> SimulatedGPU | None:
    """The GPU that CPU tensors stand for (inside :func:`simulate_gpu`), else None."""
    return _SIMULATED


@contextlib.contextmanager
def simulate_gpu(gpu: SimulatedGPU | None = None) -> Iterator[SimulatedGPU]:
    """Inside the block, the registry and the kernel launchers treat CPU tensors as ``gpu``'s.

    Only useful together with a Triton driver that compiles instead of launching (see
    ``mmict_kernels.testing.compile_only``); on its own it would send CPU tensors to GPU kernels.
    """
    global _SIMULATED
    previous, _SIMULATED = _SIMULATED, gpu or SimulatedGPU()
    try:
        yield _SIMULATED
    finally:
        _SIMULATED = previous


def effective_device_type(device_type: str) -> str:
    """``device_type``, except that CPU stands for CUDA while a GPU is simulated."""
    return "cuda" if device_type == "cpu" and _SIMULATED is not None else device_type


def on_gpu(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on a GPU (or stands for a GPU tensor in the compile-only harness)."""
    return t.is_cuda or (_SIMULATED is not None and t.device.type == "cpu")


# ---------------------------------------------------------------------------------------
# Environment probes (cached: they do not change during a process)
# ---------------------------------------------------------------------------------------
def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _cuda_extension_error() -> str | None:
    try:
        importlib.import_module("mmict_kernels._C")
    except Exception as exc:
        how = (
            "the package was installed without its CUDA extension "
            "(torch has no CUDA or no CUDA toolkit was found at `pip install -e .` time)"
        )
        return f"mmict_kernels._C is not built: {how} [{type(exc).__name__}: {exc}]"
    return None


def cuda_extension_available() -> bool:
    return _cuda_extension_error() is None


def parse_archs(archs: str) -> tuple[str, ...]:
    """``"90a;80"`` -> ``("90a", "80")`` (the list setup.py builds the extension for)."""
    return tuple(a.strip() for a in archs.replace(",", ";").split(";") if a.strip())


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS built for ``arch`` ("80", "90a", ...) runs on a GPU of ``capability``.

    The extension embeds SASS only (no PTX to JIT), so: same major version, and the GPU's minor
    version at least the build's ("80" runs on 8.0, 8.6, 8.9); an arch-specific build ("90a")
    runs only on exactly that architecture.
    """
    specific = arch.endswith("a")
    digits = arch[:-1] if specific else arch
    if not digits.isdigit() or len(digits) < 2:
        return False
    major, minor = int(digits[:-1]), int(digits[-1])
    if specific:
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def built_cuda_archs() -> tuple[str, ...]:
    """The architectures ``mmict_kernels._C`` was compiled for (empty when it is not built)."""
    if not cuda_extension_available():
        return ()
    module = importlib.import_module("mmict_kernels._C")
    return parse_archs(getattr(module, "cuda_archs", ""))


def _current_capability() -> tuple[int, int] | None:
    if _SIMULATED is not None:
        return _SIMULATED.capability
    if torch.cuda.is_available():
        return tuple(torch.cuda.get_device_capability())
    return None


def _cuda_environment(device_type: str) -> str | None:
    device_type = effective_device_type(device_type)
    if device_type != "cuda":
        return f"the CUDA kernels need CUDA tensors (got {device_type} tensors)"
    err = _cuda_extension_error()
    if err:
        return err
    capability = _current_capability()
    archs = built_cuda_archs()
    if capability is not None and not any(arch_runs_on(a, capability) for a in archs):
        built = ", ".join(f"sm_{a}" for a in archs) or "no architecture"
        return (
            f"mmict_kernels._C was built for {built}, which cannot run on this GPU (compute capability "
            f"{capability[0]}.{capability[1]}; the extension embeds no PTX): rebuild with "
            f'MMICT_KERNELS_CUDA_ARCHS="{capability[0]}{capability[1]}" pip install -e . --no-build-isolation'
        )
    return None


def _triton_environment(device_type: str) -> str | None:
    err = _triton_import_error()
    if err:
        return err
    device_type = effective_device_type(device_type)
    if device_type == "cpu" and not triton_interpret():
        return "Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 to run them in the (slow) interpreter"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels need CUDA tensors (got {device_type} tensors)"
    return None


def _torch_environment(device_type: str) -> str | None:
    return None


_ENVIRONMENT = {"cuda": _cuda_environment, "triton": _triton_environment, "torch": _torch_environment}


# ---------------------------------------------------------------------------------------
# Registration and resolution
# ---------------------------------------------------------------------------------------
def register(op: str, backend: str, module: str, attr: str, caps: Capabilities) -> None:
    """Register ``module.attr`` (imported on first use) as ``op``'s ``backend`` implementation."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def loader():
        return getattr(importlib.import_module(module), attr)

    _REGISTRY.setdefault(op, {})[backend] = _Entry(loader, module, attr, caps, _ENVIRONMENT[backend])


def capabilities(op: str, backend: str) -> Capabilities | None:
    """What ``backend``'s implementation of ``op`` supports (None: it has none)."""
    entry = _REGISTRY.get(op, {}).get(backend)
    return None if entry is None else entry.caps


def _input_refusal(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> str | None:
    """Why ``backend``'s ``op`` cannot take such inputs (ignoring the environment), or None."""
    entry = _REGISTRY.get(op, {}).get(backend)
    if entry is None:
        return f"{op} has no {backend} implementation"
    caps = entry.caps
    if effective_device_type(device_type) not in caps.devices:
        return f"the {backend} {op} does not run on {device_type}"
    if dtype not in caps.dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in caps.dtypes))
        return f"the {backend} {op} supports dtypes {{{names}}}, got {str(dtype).replace('torch.', '')}"
    if caps.head_dims is not None and head_dim not in caps.head_dims:
        return f"the {backend} {op} supports head dims {sorted(caps.head_dims)}, got {head_dim}"
    if dropout and not caps.dropout:
        return f"the {backend} {op} has no attention dropout (dropout_p > 0 in training)"
    return None


def _refusal(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> str | None:
    entry = _REGISTRY.get(op, {}).get(backend)
    if entry is None:
        return f"{op} has no {backend} implementation"
    env = entry.environment(device_type)
    if env:
        return env
    return _input_refusal(op, backend, device_type, dtype, head_dim, dropout)


def explain(op: str, *, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool = False) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run ``op`` on such inputs, else the reason it cannot."""
    return {b: _refusal(op, b, device_type, dtype, head_dim, dropout) for b in BACKENDS}


def _auto(op: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> str:
    for b in _AUTO_ORDER:
        if b == "triton" and effective_device_type(device_type) == "cpu":
            continue  # the interpreter is for tests; auto on CPU means the reference
        if _refusal(op, b, device_type, dtype, head_dim, dropout) is None:
            return b
    reasons = explain(op, device_type=device_type, dtype=dtype, head_dim=head_dim, dropout=dropout)
    raise BackendUnavailableError(f"no backend can run {op}: {reasons}")


@torch.compiler.assume_constant_result
def _choose(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> str:
    """The backend name for these static facts; imports its implementation's module.

    Under torch.compile this runs once, eagerly, at trace time, and its result is a constant of
    the graph (the decision depends only on static facts, so it never syncs or re-traces).
    """
    if backend == "auto":
        chosen = _auto(op, device_type, dtype, head_dim, dropout)
    else:
        check_backend_name(backend)
        why = _refusal(op, backend, device_type, dtype, head_dim, dropout)
        if why is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot run {op}: {why}")
        chosen = backend
    _REGISTRY[op][chosen].loader()  # import now (eagerly, also under torch.compile)
    return chosen


def resolve(
    op: str,
    backend: str,
    *,
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    dropout: bool = False,
) -> tuple[str, Callable]:
    """Choose the implementation of ``op`` for ``backend`` ("auto", "cuda", "triton" or "torch")."""
    name = _choose(op, backend, device_type, dtype, head_dim, bool(dropout))
    # The module was imported by _choose; sys.modules lookup + getattr is traceable by torch.compile
    # (importlib is not, and a dict filled during the trace would be stale in dynamo's copy).
    entry = _REGISTRY[op][name]
    return name, getattr(sys.modules[entry.module], entry.attr)


@torch.compiler.assume_constant_result
def module_choice(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool = False) -> str:
    """The backend a module's ``backend`` setting means for one op call.

    ``"auto"``, ``"triton"``, ``"torch"``: themselves (an explicit one that cannot run raises when
    the op is called). ``"cuda"``: the CUDA kernel where ``op`` has one that takes these inputs,
    else what ``"auto"`` picks (e.g. hub_self_attention, or attention dropout in training); but if
    the CUDA extension itself cannot run here (not built, another GPU architecture, CPU tensors),
    that is an error: the user asked for CUDA and gets none of it.
    """
    check_backend_name(backend)
    if backend != "cuda":
        return backend
    env = _cuda_environment(device_type)
    if env is not None:
        raise BackendUnavailableError(f"backend='cuda': {env}")
    if _input_refusal(op, "cuda", device_type, dtype, head_dim, bool(dropout)) is None:
        return "cuda"
    return "auto"


def available_backends(op: str, *, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool = False) -> list[str]:
    """The backends that can run ``op`` on such inputs, in auto order."""
    return [
        b
        for b, why in explain(op, device_type=device_type, dtype=dtype, head_dim=head_dim, dropout=dropout).items()
        if why is None
    ]


def registered_ops() -> Iterable[str]:
    return tuple(_REGISTRY)
