"""Where tests run, in one place: the GPU / Triton / CUDA-extension skips every test file uses.

Without a GPU, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before Triton is imported, so the
Triton kernels run in Triton's CPU interpreter at small ragged shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

from mmict_kernels import backends

ON_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton tests run on a GPU, or on the CPU in the interpreter.
TRITON_DEVICE = "cuda" if ON_GPU and not INTERPRET else "cpu"

requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(not (ON_GPU or INTERPRET), reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")
requires_cuda_extension = pytest.mark.skipif(
    not (ON_GPU and backends.cuda_extension_available()), reason="needs a CUDA GPU and the built mmict_kernels._C"
)
# Shapes too large for the interpreter run on a GPU only.
gpu_only_shape = pytest.mark.skipif(INTERPRET or not ON_GPU, reason="GPU-only shape (too slow for the interpreter)")
