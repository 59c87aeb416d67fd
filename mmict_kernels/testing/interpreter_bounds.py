"""Out-of-bounds checks for Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter turns ``tl.load``/``tl.store``/atomics into raw reads and writes at the computed
addresses: a kernel that indexes past its tensors reads whatever lies there (or crashes the
process, or silently overwrites other memory) instead of failing like ``compute-sanitizer`` would
on a GPU. :func:`checked_memory_access` closes that gap for tests: inside the block, every
unmasked lane of every load, store and atomic of an interpreted kernel must address bytes inside
one of the tensors passed to that launch, else :class:`OutOfBoundsAccess` is raised *before* the
access happens (the interpreter wraps it in its own ``InterpreterError``; the violations are also
kept in the yielded log, with the number of launches per kernel).

Bounds are each tensor's own elements (its view: from its lowest to its highest addressed
element), not its whole storage, so reading a neighbouring row of a parent buffer counts too.

    with checked_memory_access() as log:
        ops.prefix_attention(..., backend="triton")
    assert log.kernels and not log.violations  # kernels ran, none out of bounds
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch


class OutOfBoundsAccess(RuntimeError):
    """An interpreted kernel addressed memory outside every tensor of its launch."""


@dataclasses.dataclass
class Violation:
    kernel: str
    access: str  # load, store, atomic
    address: int
    lanes: int  # how many lanes of this access were outside

    def __str__(self) -> str:
        return f"{self.kernel}: {self.access} of {self.lanes} lane(s) outside its tensors (first at 0x{self.address:x})"


@dataclasses.dataclass
class BoundsLog:
    violations: list[Violation] = dataclasses.field(default_factory=list)
    kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # launches per kernel name


def _tensor_ranges(values) -> list[tuple[int, int]]:
    """[lo, hi) byte ranges of the tensors among ``values`` (tuples searched too)."""
    ranges = []
    for v in values:
        if isinstance(v, tuple | list):
            ranges += _tensor_ranges(v)
        elif isinstance(v, torch.Tensor) and v.numel() > 0:
            base = v.data_ptr()
            low = sum((s - 1) * st for s, st in zip(v.shape, v.stride()) if st < 0)
            high = sum((s - 1) * st for s, st in zip(v.shape, v.stride()) if st > 0)
            ranges.append((base + low * v.element_size(), base + (high + 1) * v.element_size()))
    return ranges


@contextlib.contextmanager
def checked_memory_access() -> Iterator[BoundsLog]:
    """See the module docstring. Needs ``TRITON_INTERPRET=1`` (kernels defined as interpreted functions)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    executor = interpreter.GridExecutor
    for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas"):
        if not hasattr(builder, name):  # pragma: no cover - another Triton's interpreter
            raise RuntimeError(f"checked_memory_access: this Triton's interpreter has no InterpreterBuilder.{name}")
    log = BoundsLog()
    violations = log.violations
    launches: list[tuple[str, list[tuple[int, int]]]] = []

    def check(access: str, ptrs, mask) -> None:
        if not launches:
            return
        kernel, ranges = launches[-1]
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        lanes = (
            np.ones(addresses.shape, dtype=bool)
            if mask is None
            else np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        )
        addresses = addresses[lanes]
        if addresses.size == 0:
            return
        size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in ranges:
            inside |= (addresses >= np.uint64(lo)) & (addresses + size <= np.uint64(hi))
        if not inside.all():
            bad = addresses[~inside]
            violations.append(Violation(kernel, access, int(bad[0]), int(bad.size)))
            raise OutOfBoundsAccess(str(violations[-1]))

    originals = {
        "create_masked_load": builder.create_masked_load,
        "create_masked_store": builder.create_masked_store,
        "create_atomic_rmw": builder.create_atomic_rmw,
        "create_atomic_cas": builder.create_atomic_cas,
        "__call__": executor.__call__,
    }

    def masked_load(self, ptrs, mask, *args, **kwargs):
        check("load", ptrs, mask)
        return originals["create_masked_load"](self, ptrs, mask, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        check("store", ptrs, mask)
        return originals["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        check("atomic", ptr, mask)
        return originals["create_atomic_rmw"](self, op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(self, ptr, cmp, val, *args, **kwargs):
        check("atomic", ptr, None)
        return originals["create_atomic_cas"](self, ptr, cmp, val, *args, **kwargs)

    def launch(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", str(self.fn))
        log.kernels[name] += 1
        launches.append((name, _tensor_ranges(list(args) + list(kwargs.values()))))
        try:
            return originals["__call__"](self, *args, **kwargs)
        finally:
            launches.pop()

    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.create_atomic_rmw = atomic_rmw
    builder.create_atomic_cas = atomic_cas
    executor.__call__ = launch
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(executor if name == "__call__" else builder, name, fn)


__all__ = ["checked_memory_access", "BoundsLog", "OutOfBoundsAccess", "Violation"]
