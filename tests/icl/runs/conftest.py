"""Shared by the run tests: the tiny run's config, one CPU thread, and ONE two-process torchrun for all multi-process checks.

Starting two processes (imports, process group) costs far more than the tiny runs they do, so
``two_processes`` runs every multi-process scenario (``two_process_scenarios.py``) in a single
``torchrun --nproc_per_node=2`` (gloo) per test session and hands the results to the tests.
"""

import os
import subprocess
import sys

import pytest
import torch

from helpers.threads import one_thread
from helpers.tiny_run import TINY_RUN_OVERRIDES

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def tiny():
    """``tiny(out, *extra)``: the tiny run's overrides writing to ``out``, plus ``extra``."""
    return lambda out, *extra: [*TINY_RUN_OVERRIDES, *extra, f"train.output_dir={out}"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory):
    """Results of ``two_process_scenarios.py`` under ``torchrun --nproc_per_node=2``: rank 0's dict, each rank's numbers."""
    out = tmp_path_factory.mktemp("two_processes")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "two_process_scenarios.py"), str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    results = torch.load(out / "results.pt", weights_only=False)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(results["world"])]
    return {"out": out, "results": results, "ranks": ranks, "stdout": done.stdout}
