"""``train.precision`` on one device: the autocast dtype and, for fp16, the loss scaler.

On a GPU (or a simulated one, in the compile-only harness) ``bf16`` and ``fp16`` autocast the
step; ``fp16`` also scales the loss with a :class:`torch.amp.GradScaler` (fp16's range is too
small for small gradients). ``fp32`` and every CPU run compute in float32 (``on_cpu=True``
autocasts on a CPU too, for tests of the fp16 path).
"""

from __future__ import annotations

import contextlib

import torch

from .. import backends

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class MixedPrecision:
    def __init__(self, precision: str, device: torch.device, on_cpu: bool = False):
        if precision not in DTYPES:
            raise ValueError(f"train.precision: expected one of {list(DTYPES)}, got {precision!r}")
        self.precision = precision
        self.device_type = torch.device(device).type
        gpu = backends.effective_device_type(self.device_type) == "cuda"
        self.dtype: torch.dtype | None = DTYPES[precision] if (gpu or on_cpu) else None
        self.scaler = torch.amp.GradScaler(self.device_type) if self.dtype is torch.float16 else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """What the matmuls compute in."""
        return self.dtype or torch.float32

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        if self.dtype is None:
            return "float32" + (f" (train.precision {self.precision} applies on GPUs)" if self.precision != "fp32" else "")
        scaled = ", GradScaler" if self.scaler is not None else ""
        return f"{str(self.dtype).replace('torch.', '')} autocast{scaled}"

    # --- the loss scaler's part of a step (no-ops without one) ---
    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when a gradient is inf/NaN (the scale then shrinks)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
