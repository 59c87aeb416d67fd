"""The training step makes no host sync with every training feature on (run compile-only, as a GPU would run it)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_training_step_makes_no_host_sync(tmp_path):
    """The step with every feature on (2 micro-batches, fp16 with the scaler, clipping, gradient
    checkpointing, the shared prefix) as a GPU would run it: kernels compile for sm_90, nothing
    launches, nothing reads a device value, and the loss comes back as a tensor. In a fresh process
    without TRITON_INTERPRET (``@triton.jit`` reads it at import) and with a fresh Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_sync_step.py")
    done = subprocess.run([sys.executable, script], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert not result["errors"], result["errors"]
    assert result["syncs"] == 0, result["where"]
    assert result["loss_is_tensor"] and result["scaler"] and result["micro_batches"] == 2
