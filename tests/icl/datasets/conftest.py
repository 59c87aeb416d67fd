"""The data set tests run tiny models on a shared machine: one thread each."""

import pytest

from helpers.threads import one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield
