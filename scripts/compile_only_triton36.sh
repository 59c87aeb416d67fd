#!/usr/bin/env bash
# The compile-only GPU harness under Triton 3.6, the Triton of the GPU machines' image, beside the
# Triton that CI installs: a kernel that compiles with one version can fail with the other.
# Triton 3.6 goes into its own virtual environment that sees the installed torch and package
# (--system-site-packages); its wheel (~190 MB) bundles ptxas, so it compiles for sm_90 without a GPU.
#
#   bash scripts/compile_only_triton36.sh          # the harness's own checks + one scenario per kernel family (sm_90)
#   bash scripts/compile_only_triton36.sh --full   # every training scenario (sm_90) and the smoke set at sm_80
#
# Env: VENV (default ${TMPDIR:-/tmp}/venv-triton36, reused when it already has Triton 3.6.0).
# Exit status: non-zero on a compile error, a spill in a training scenario or a host-sync count over its allowance.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=3.6.0
VENV="${VENV:-${TMPDIR:-/tmp}/venv-triton36}"
start=$(date +%s)

if ! "$VENV/bin/python" -c "import sys, triton; sys.exit(triton.__version__ != '$VERSION')" 2>/dev/null; then
    python -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "triton==$VERSION"
fi
PY="$VENV/bin/python"
"$PY" -c "import torch, triton, mmict_kernels; print('triton', triton.__version__, '| torch', torch.__version__, '| mmict_kernels from', mmict_kernels.__file__)"
echo "compile_only_triton36: environment ready in $(( $(date +%s) - start )) s"

# The harness catches what it exists for (a plain module-level float fails to compile, spills and
# launch limits are reported, HostSyncCounter, bounds checks) with this Triton.
"$PY" -m pytest -q -p no:cacheprovider tests/gpu_readiness/test_harness_catches.py

# One scenario per kernel family and dtype class (gpu_scenarios.SMOKE_SCENARIOS): the M-Hub
# (attention, dropout, epilogues, float32), packed video, prefix attention (head dims 128 and 64,
# GQA, deterministic, decode, the MMICT step's short rows).
harness() {
    env -u TRITON_INTERPRET TRITON_CACHE_DIR="$(mktemp -d)" "$PY" -m mmict_kernels.testing.gpu_scenarios "$@"
}
if [ "${1:-}" = --full ]; then
    harness --arch 90 --training --fail-on-spill
    # sm_80 (A100): the smoke set, no spill in its training scenarios either (kernel_resources.md)
    harness --arch 80 --smoke --fail-on-spill
else
    harness --arch 90 --smoke --fail-on-spill
fi
echo "compile_only_triton36: done in $(( $(date +%s) - start )) s"
