#!/usr/bin/env bash
# One GPU session in one call: build, test, sanitize, benchmark; a short table last.
#
#   bash benchmarks/gpu_session.sh                 # on the device, from the repository root; results in $OUT
#   BENCH_ARGS="--quick" bash benchmarks/gpu_session.sh
#
# Knobs (environment): OUT (results folder; default ./gpu_out), BUDGET_S (seconds for the whole
# script, default 540, so a 600 s call still returns), BENCH_ARGS (extra bench_hub.py flags),
# SKIP_BUILD=1, SKIP_TESTS=1, SKIP_SANITIZER=1. Extra wheels (xformers 0.0.35, ...) are installed from .whl/
# when the call carries that folder (see the device README).
# What comes back (at most 8 files): session.log, the two CSVs, and one PNG per op / module.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1
left() { local l=$(( BUDGET_S - ($(date +%s) - START) )); echo $(( l > 1 ? l : 1 )); }  # never 0: `timeout 0` means no limit
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
STATUS=()

{
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"

if compgen -G ".whl/*.whl" > /dev/null; then
    step "extra wheels from .whl/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && STATUS+=("wheels: installed") || STATUS+=("wheels: FAILED")
fi

if [ "${SKIP_BUILD:-0}" = 1 ]; then
    STATUS+=("build: skipped (SKIP_BUILD=1)")
else
step "build (MAX_JOBS=16, sm_90a only)"
if MAX_JOBS=16 MMICT_KERNELS_CUDA_ARCHS="90a" timeout "$(left)" python3 -m pip install -v -e . --no-build-isolation --no-deps 2>&1 | tail -25; then
    STATUS+=("build: ok")
else
    STATUS+=("build: FAILED (see above)")
fi
fi
python3 -c "import mmict_kernels as m; print('mmict_kernels._C built:', m.backends.cuda_extension_available())"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    step "tests (GPU tests run here)"
    t=$(( $(left) * 2 / 5 ))  # leave most of the budget to the benchmark
    timeout "$t" python3 -m pytest -x -q -p no:cacheprovider tests/ 2>&1 | tail -40
    rc=${PIPESTATUS[0]}
    STATUS+=("tests: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')")
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ] && [ -f scripts/sanitize_cuda.py ]; then
    step "compute-sanitizer (memcheck) on scripts/sanitize_cuda.py"
    timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/sanitize_cuda.py 2>&1 | tail -20
    rc=${PIPESTATUS[0]}
    STATUS+=("compute-sanitizer: exit $rc")
elif [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    STATUS+=("compute-sanitizer: skipped (no scripts/sanitize_cuda.py)")
fi

step "benchmark (bench_hub.py ${BENCH_ARGS:-})"
t=$(( $(left) > 30 ? $(left) - 15 : 15 ))  # keep a few seconds for the plots and the table
# shellcheck disable=SC2086
timeout "$t" python3 benchmarks/bench_hub.py --out "$OUT" --no-plot ${BENCH_ARGS:-}
rc=$?
STATUS+=("benchmark: exit $rc$([ "$rc" = 124 ] && echo ' (timed out: the CSV holds the rows measured until then; compiled peers run last)')")

step "plots"
for csv in "$OUT"/bench_hub_*.csv; do
    case "$csv" in *_unavailable.csv) ;; *) timeout 60 python3 benchmarks/plot.py "$csv" --out "$OUT" ;; esac
done

step "short table (from the CSV: also after a timeout)"
printf '%s\n' "${STATUS[@]}"
for csv in "$OUT"/bench_hub_*.csv; do
    case "$csv" in *_unavailable.csv) ;; *) python3 benchmarks/bench_results.py "$csv" ;; esac
done
} 2>&1 | tee "$LOG"
