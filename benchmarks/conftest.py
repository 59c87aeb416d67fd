"""pytest set-up for the benchmark suite (``pytest benchmarks/ --benchmark-only``)."""

import os
import sys

import torch

# Without a GPU our Triton kernels run in Triton's CPU interpreter, which must be chosen before
# triton is first imported (as in tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Time the kernels, not the ops' data-dependent input checks (each syncs with a GPU).
os.environ.setdefault("MMICT_KERNELS_SKIP_VALUE_CHECKS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
