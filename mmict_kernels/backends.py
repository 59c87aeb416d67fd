"""Backend registry: which implementation (cuda, triton, torch) runs an op, and why.

Every op registers one implementation per backend together with what that
implementation supports (dtypes, head dims, attention dropout, ...).
``backend="auto"`` picks the first usable one in the order cuda -> triton -> torch;
an explicit request for a backend that cannot run raises
:class:`BackendUnavailableError` with every reason it was refused.

The decision only looks at static facts (device type, dtype, head dim, flags),
so it is made once at trace time under ``torch.compile`` and never syncs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from typing import Callable, Iterable

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


@dataclasses.dataclass
class _Entry:
    loader: Callable[[], Callable]  # imports lazily and returns the implementation
    module: str
    attr: str
    caps: Capabilities
    environment: Callable[[str], str | None]  # device type -> reason it cannot run, or None


_REGISTRY: dict[str, dict[str, _Entry]] = {}


# ---------------------------------------------------------------------------------------
# Environment probes (cached: they do not change during a process)
# ---------------------------------------------------------------------------------------
def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
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


def _cuda_environment(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"the CUDA kernels need CUDA tensors (got {device_type} tensors)"
    return _cuda_extension_error()


def _triton_environment(device_type: str) -> str | None:
    err = _triton_import_error()
    if err:
        return err
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


def _refusal(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> str | None:
    entry = _REGISTRY.get(op, {}).get(backend)
    if entry is None:
        return f"{op} has no {backend} implementation"
    env = entry.environment(device_type)
    if env:
        return env
    caps = entry.caps
    if device_type not in caps.devices:
        return f"the {backend} {op} does not run on {device_type}"
    if dtype not in caps.dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in caps.dtypes))
        return f"the {backend} {op} supports dtypes {{{names}}}, got {str(dtype).replace('torch.', '')}"
    if caps.head_dims is not None and head_dim not in caps.head_dims:
        return f"the {backend} {op} supports head dims {sorted(caps.head_dims)}, got {head_dim}"
    if dropout and not caps.dropout:
        return f"the {backend} {op} has no attention dropout (dropout_p > 0 in training)"
    return None


def explain(op: str, *, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool = False) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run ``op`` on such inputs, else the reason it cannot."""
    return {b: _refusal(op, b, device_type, dtype, head_dim, dropout) for b in BACKENDS}


@torch.compiler.assume_constant_result
def _choose(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> str:
    """The backend name for these static facts; imports its implementation's module.

    Under torch.compile this runs once, eagerly, at trace time, and its result is a constant of
    the graph (the decision depends only on static facts, so it never syncs or re-traces).
    """
    if backend == "auto":
        for b in _AUTO_ORDER:
            if b == "triton" and device_type == "cpu":
                continue  # the interpreter is for tests; auto on CPU means the reference
            if _refusal(op, b, device_type, dtype, head_dim, dropout) is None:
                chosen = b
                break
        else:
            reasons = explain(op, device_type=device_type, dtype=dtype, head_dim=head_dim, dropout=dropout)
            raise BackendUnavailableError(f"no backend can run {op}: {reasons}")
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


def available_backends(op: str, *, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool = False) -> list[str]:
    """The backends that can run ``op`` on such inputs, in auto order."""
    return [b for b, why in explain(op, device_type=device_type, dtype=dtype, head_dim=head_dim, dropout=dropout).items() if why is None]


def registered_ops() -> Iterable[str]:
    return tuple(_REGISTRY)
