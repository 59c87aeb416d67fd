"""The data set tests run tiny models on a shared machine: one thread each."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models on a shared 2-core machine: more threads only fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
