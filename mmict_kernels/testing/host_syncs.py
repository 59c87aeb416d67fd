"""Count the device-to-host synchronisations a step would make on a GPU, on a CPU.

Each of these stalls the GPU until its queue drains, then the host reads a value:

- ``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)`` (so every
  ``if tensor:`` or ``if (t == 0).any():``);
- ops whose output shape depends on the data: ``nonzero``, ``unique*``, ``masked_select``,
  boolean-mask indexing (``aten.index.Tensor`` / ``index_put`` with a bool index), and
  ``repeat_interleave`` without ``output_size``;
- ``Tensor.tolist()`` and ``Tensor.numpy()`` (on a GPU tensor: a copy to the host). These do
  not dispatch on a CPU tensor, so they are counted by wrapping the two methods.

:class:`HostSyncCounter` is a ``TorchDispatchMode``: it sees every aten call below the Python
layer, including those inside modules and autograd's backward. Used with
:func:`mmict_kernels.testing.compile_only.compile_only` (kernels compile, nothing runs) it shows
how many times a training step or a generate step would stop a GPU.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS_SYNC = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.masked_select",
    "aten.equal",
    "aten.is_nonzero",
}


def _op_name(func) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or ()) if t is not None)


def _is_sync(func, args, kwargs) -> bool:
    name = _op_name(func)
    if name in _ALWAYS_SYNC:
        return True
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        return _has_bool_index(args)
    if name == "aten.repeat_interleave":
        # x.repeat_interleave(repeats_tensor) reaches the dispatch mode decomposed into the
        # ``Tensor`` overload (repeats, output_size): its output length is repeats.sum(), read on
        # the host unless output_size is given. ``self_int`` (a Python int) never syncs.
        overload = getattr(func, "_overloadname", "")
        repeats_at, size_at = {"Tensor": (0, 1), "self_Tensor": (1, 3)}.get(overload, (None, None))
        if repeats_at is None or len(args) <= repeats_at or not isinstance(args[repeats_at], torch.Tensor):
            return False
        return kwargs.get("output_size", args[size_at] if len(args) > size_at else None) is None
    return False


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: step()`` then ``c.count``, ``c.by_op``, ``c.where`` (a short stack per sync)."""

    def __init__(self, keep_stacks: bool = True):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self.where: list[str] = []
        self._keep_stacks = keep_stacks
        self._wrapped: list[tuple[str, object]] = []

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def _record(self, name: str) -> None:
        self.by_op[name] += 1
        if self._keep_stacks:
            frames = [
                f for f in traceback.extract_stack()[:-3] if "site-packages" not in f.filename and "<frozen" not in f.filename
            ]
            self.where.append(f"{name} at " + " <- ".join(f"{os_basename(f.filename)}:{f.lineno}" for f in frames[-4:][::-1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._record(_op_name(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._wrapped.append((method, original))

            def counted(t, *a, _original=original, _name=f"Tensor.{method}", **k):
                self._record(_name)
                return _original(t, *a, **k)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._wrapped:
            setattr(torch.Tensor, method, original)
        self._wrapped.clear()
        return super().__exit__(*exc)

    def report(self) -> str:
        return f"{self.count} host syncs: {dict(self.by_op)}" + "".join(f"\n  {w}" for w in self.where)


def os_basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


__all__ = ["HostSyncCounter"]
