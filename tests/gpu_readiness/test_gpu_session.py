"""benchmarks/gpu_session.sh on a CPU: its budget logic (dry run, GPU steps stubbed) and its test selection.

The script runs on a GPU machine lent in short windows, so it must end inside BUDGET_S whatever
its steps do, return at most 8 files and print its summary table last. The dry run replaces each
GPU step by a stub that sleeps (past its cap for the steps named in DRY_SLOW_STEPS) and writes
the files the real step writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from gpu_readiness.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ("build", "tests", "memcheck", "racecheck", "bench", "resources")


def dry_run(out: Path, budget_s: int, **env) -> tuple[float, list[str]]:
    full_env = {**os.environ, "GPU_SESSION_DRY_RUN": "1", "BUDGET_S": str(budget_s), "OUT": str(out), **env}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=budget_s + 60)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return took, proc.stdout.rstrip("\n").splitlines()


def summary_of(lines: list[str]) -> list[str]:
    """The lines from the summary header to the end (the summary must be the last thing printed)."""
    starts = [i for i, line in enumerate(lines) if "] summary (budget" in line]
    assert len(starts) == 1, lines
    return lines[starts[0] + 1 :]


def test_dry_run_fast_steps(tmp_path):
    took, lines = dry_run(tmp_path, budget_s=30, DRY_EXTRA_FILES="3")
    assert took < 30
    summary = summary_of(lines)
    for step in STEPS:
        assert any(line.startswith(step) and " ok " in line for line in summary), (step, summary)
    assert summary[-1].startswith(f"files in {tmp_path}: 8 (at most 8)")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "extra.tar.gz" in files  # the 3 extra files were packed
    assert {"session.log", "tests.xml", "sanitizer.log", "kernel_resources_gpu_machine.csv"} <= set(files)
    assert summary_of((tmp_path / "session.log").read_text().rstrip("\n").splitlines()) == summary


def test_dry_run_every_step_overruns_and_the_budget_holds(tmp_path):
    budget = 16
    took, lines = dry_run(tmp_path, budget_s=budget, DRY_SLOW_STEPS="all")
    assert took <= budget, f"{took:.1f}s for a {budget}s budget"
    summary = summary_of(lines)
    assert any(line.startswith("build") and "TIMED OUT" in line for line in summary), summary
    assert any(line.startswith("bench") and "TIMED OUT" in line for line in summary), summary
    assert summary[-1].startswith("files in") and f"of {budget}s" in summary[-1]
    assert len(list(tmp_path.iterdir())) <= 8


def test_dry_run_a_slow_build_leaves_time_for_the_benchmark(tmp_path):
    took, lines = dry_run(tmp_path, budget_s=20, DRY_SLOW_STEPS="build")
    summary = summary_of(lines)
    assert took < 20
    assert any(line.startswith("build") and "TIMED OUT" in line for line in summary)
    for step in STEPS[1:]:
        assert any(line.startswith(step) and " ok " in line for line in summary), (step, summary)


def test_gpu_only_selection():
    """--gpu-only keeps the GPU-only tests (CUDA-kernel tests first) and drops those a CPU runs."""
    files = ["tests/ops/test_backends.py", "tests/modules/mhub/test_triton.py", "tests/ops/prefix_attn/test_cuda.py"]
    files = [f for f in files if (ROOT / f).exists()]
    args = ["-p", "gpu_readiness.gpu_only_plugin", "--gpu-only", "--collect-only", "-q", *files]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert proc.returncode == 0 and ids, proc.stdout + proc.stderr
    assert "deselected" in proc.stdout  # the CPU tests of these files were collected, then dropped
    assert not any("test_backends.py" in i for i in ids)  # runs on a CPU
    cuda = [i for i, name in enumerate(ids) if "/test_cuda" in name]
    assert cuda and cuda == list(range(len(cuda)))  # CUDA-kernel tests first
    assert any("test_cuda_graph" in i for i in ids)  # a GPU-only module test (skipif: CUDA graphs need a GPU)
