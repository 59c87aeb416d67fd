import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. It must be switched on before
# triton is first imported, so it is set here, before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    import mmict_kernels

    lines = [f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append(f"mmict_kernels._C built: {mmict_kernels.backends.cuda_extension_available()}")
    return lines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
