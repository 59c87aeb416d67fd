"""One torch thread for tests that run tiny models.

On a shared 2-core machine more intra-op threads only fight each other (tiny models run several
times slower with two threads than with one), so these tests pin torch to one thread and give the
caller's setting back afterwards.
"""

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
