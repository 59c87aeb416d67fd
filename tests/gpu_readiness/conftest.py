"""Fixtures of the GPU-readiness checks: the compile-only harness runs in subprocesses.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` for the pytest process (without a GPU), and
``@triton.jit`` reads it at import time, so every compile-only run happens in a fresh Python
process without it, with a fresh ``TRITON_CACHE_DIR`` (a cached kernel would skip Triton's front
end and hide a compile error). The scenario runs are session fixtures: each test reads their
JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# The sm_80 pass: one scenario per kernel family and dtype class (the sm_90 pass runs them all).
SM80_SCENARIOS = (
    "mhub_train_bf16",
    "mhub_no_dropout_fp32",
    "mhub_video_packed_bf16",
    "prefix_llm2048_bf16",
    "prefix_qwen2_d64_gqa7_fp16",
    "prefix_llm4096_gqa_bf16_deterministic",
    "prefix_llm4096_gqa_bf16_decode",
)
HARNESS_TIMEOUT_S = 1200


def compile_only_env(cache_dir: Path) -> dict[str, str]:
    """The environment of a compile-only subprocess: no interpreter, a fresh Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return env


def run_python(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a tiny_kernels.py run printed on its ``RESULT`` line."""
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"no RESULT line (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _merge(reports: list[dict]) -> dict:
    """One report from the runs of one target (scenario summaries, kernel records and problems joined)."""
    merged = {"scenarios": {}, "records": [], "problems": [], "kernels": 0, "launches": 0, "log": ""}
    for r in reports:
        merged["scenarios"].update(r["scenarios"])
        for key in ("records", "problems"):
            merged[key] += r[key]
        for key in ("kernels", "launches"):
            merged[key] += r[key]
        merged["log"] += r["log"]
    return merged


@pytest.fixture(scope="session")
def harness_reports(tmp_path_factory) -> dict[int, dict]:
    """The scenario harness at sm_90 (every scenario, in two processes: the M-Hub ones and the rest)
    and sm_80 (SM80_SCENARIOS), three processes side by side with one intra-op thread each (CI has
    2 cores; the compiles are serial per process); {arch: the JSON report}."""
    from mmict_kernels.testing.gpu_scenarios import scenarios

    names = [s.name for s in scenarios()]
    mhub = [n for n in names if n.startswith("mhub_")]
    jobs = [(90, mhub), (90, [n for n in names if n not in mhub]), (80, list(SM80_SCENARIOS))]
    runs = []
    for i, (arch, selected) in enumerate(jobs):
        out = tmp_path_factory.mktemp(f"sm{arch}-{i}")
        env = compile_only_env(out / "triton-cache")
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "mmict_kernels.testing.gpu_scenarios", "--arch", str(arch), "--keep-cache",
               "--json", str(out / "report.json"), "--names", ",".join(selected)]  # fmt: skip
        log = open(out / "log.txt", "w")  # noqa: SIM115 - closed below
        runs.append((arch, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), out, log))
    reports: dict[int, list[dict]] = {}
    start = time.monotonic()
    for arch, proc, out, log in runs:
        try:
            proc.wait(timeout=max(1, HARNESS_TIMEOUT_S - (time.monotonic() - start)))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = (out / "log.txt").read_text()
        if not (out / "report.json").exists():
            raise AssertionError(f"sm_{arch} harness wrote no report (exit {proc.returncode}):\n{text[-4000:]}")
        report = json.loads((out / "report.json").read_text())
        reports.setdefault(arch, []).append({**report, "log": text})
    return {arch: _merge(parts) for arch, parts in reports.items()}
