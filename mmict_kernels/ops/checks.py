"""Up-front input checks shared by the ops and modules: every message names the argument and what was expected.

Shape, dtype and device checks are static (free under ``torch.compile``). Value checks on index
tensors (``text_lengths``, ``cu_seqlens_k``, ``prefix_ids``, ...) never stop the GPU: on a GPU
they run as device-side asserts (``torch._assert_async``: no host sync; a failure aborts the
stream with the message), on a CPU they raise a ValueError with the offending values. They are
skipped while compiling, while capturing a CUDA graph, inside :func:`skip_value_checks`, or when
``MMICT_KERNELS_SKIP_VALUE_CHECKS=1``; the kernels clamp every index into their tensors, so even
then bad values give wrong numbers, never an out-of-bounds access.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from .. import backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt_dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected a {' or '.join(map(str, allowed))}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {{{', '.join(_fmt_dtype(d) for d in dtypes)}}}, got {_fmt_dtype(t.dtype)}")
    return t


def autocast_inputs(*tensors):
    """Under autocast, the float tensors cast to the autocast dtype (as SDPA does); else unchanged.

    Mixed dtypes are what autocast produces around attention (e.g. a float32 RoPE output beside
    bfloat16 values), so the ops cast like the attention they replace instead of refusing them.
    """
    ref = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if ref is None or not torch.is_autocast_enabled(ref.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(ref.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)  # fmt: skip


def check_same_dtype_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {_fmt_dtype(ref.dtype)} (same as {ref_name}), got {_fmt_dtype(t.dtype)}")
        if t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {t.device}")


def check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    """Kernels read head-dim vectors: the last dim must have stride 1 (other strides are free)."""
    for name, t in tensors.items():
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected the last (head) dim to be contiguous (stride 1), got strides {tuple(t.stride())}")


def check_head_dim(name: str, head_dim: int) -> None:
    if head_dim <= 0 or head_dim > 256:
        raise ValueError(f"{name}: head dim must be in [1, 256], got {head_dim}")


def check_index_tensor(name: str, t, *, shape: tuple[int, ...], dtypes, device: torch.device) -> torch.Tensor:
    check_tensor(name, t, dtypes=dtypes)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (same as q), got {t.device}")
    return t


_SKIP_VALUE_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("mmict_skip_value_checks", default=False)


@contextlib.contextmanager
def skip_value_checks():
    """Skip the data-dependent checks (index ranges, lengths) of every op called inside the block.

    Each such check costs a device sync; a caller that validated its index tensors once (e.g. a
    decode loop calling prefix_attention in every layer and step) can skip the repeats. Shape,
    dtype and device checks still run. Out-of-range values are then the caller's responsibility.
    """
    token = _SKIP_VALUE_CHECKS.set(True)
    try:
        yield
    finally:
        _SKIP_VALUE_CHECKS.reset(token)


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Whether data-dependent checks (which sync with the device) may run now."""
    if torch.compiler.is_compiling():
        return False
    if os.environ.get("MMICT_KERNELS_SKIP_VALUE_CHECKS", "0") == "1" or _SKIP_VALUE_CHECKS.get():
        return False
    if any(t.is_cuda for t in tensors if t is not None) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def expect(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of the bool tensor ``condition`` holds.

    On a GPU (or a simulated one) this is a device-side assert: no host sync, the stream aborts
    with ``message`` if it fails. On a CPU it is checked at once.
    """
    condition = condition.all() if condition.dim() > 0 else condition
    if backends.on_gpu(condition):
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def check_range(name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """Every element of ``t`` in [low, high] (a device-side assert on a GPU: no host sync)."""
    if t.numel() == 0:
        return
    if backends.on_gpu(t):
        expect((t >= low) & (t <= high), f"{name}: expected {what} in [{low}, {high}]")
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi > high:
        raise ValueError(f"{name}: expected {what} in [{low}, {high}], got values in [{lo}, {hi}]")


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim**-0.5
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not softmax_scale > 0 or softmax_scale == float("inf"):
        raise ValueError(f"softmax_scale: expected a positive finite float, got {softmax_scale}")
    return float(softmax_scale)


def check_dropout(dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    return float(dropout_p)


# The backend argument's check lives with the backends' names (one source): re-exported here for the ops.
from ..backends import check_backend_name  # noqa: E402,F401
