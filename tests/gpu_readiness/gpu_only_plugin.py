"""pytest plugin: ``--gpu-only`` keeps the tests that only a GPU runs, CUDA-kernel tests first.

(torch.compile tests, which spend minutes in inductor, run last.)

A test is GPU-only when one of its ``skipif`` markers gives a GPU as the reason to skip: the
``requires_gpu`` / ``requires_cuda_extension`` / ``gpu_only_shape`` marks of ``tests/helpers``
and the files' own ``skipif(..., reason="... needs a CUDA GPU ...")``. Tests that also run on a CPU
(e.g. Triton tests under ``TRITON_INTERPRET=1``) are left out. The selection is made from the
markers' reasons, not their conditions, so it is the same on a CPU (to check it) and on a GPU.

    PYTHONPATH=tests python -m pytest -p gpu_readiness.gpu_only_plugin --gpu-only -x tests/
"""

from __future__ import annotations

import re

GPU_REASON = re.compile(r"needs? a (CUDA )?GPU|GPU-only|checked on a GPU|need a GPU|_C is not built", re.IGNORECASE)
CPU_TOO = re.compile(r"TRITON_INTERPRET|usable here", re.IGNORECASE)  # skips that a CPU can satisfy


def is_gpu_only(item) -> bool:
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if GPU_REASON.search(reason) and not CPU_TOO.search(reason):
            return True
    return False


def order(item) -> int:
    """CUDA-kernel tests first, torch.compile (inductor, minutes) last, the rest between."""
    name = item.path.name
    return 0 if name.startswith("test_cuda") else 2 if name.startswith("test_compile") else 1


def pytest_addoption(parser):
    parser.addoption("--gpu-only", action="store_true", help="keep only GPU-only tests (CUDA-kernel tests first)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gpu-only"):
        return
    keep = [item for item in items if is_gpu_only(item)]
    keep.sort(key=order)  # stable: file order kept within each group
    dropped = [item for item in items if not is_gpu_only(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
