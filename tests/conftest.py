import os

import pytest
import torch


def pytest_report_header(config):
    import mmict_kernels

    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append(f"mmict_kernels._C built: {mmict_kernels.backends.cuda_extension_available()}")
    return lines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
