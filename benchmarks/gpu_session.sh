#!/usr/bin/env bash
# One GPU session in one command: build, kernel tests, compute-sanitizer, benchmark, resource table;
# a short table last. For a GPU machine lent in short windows (15 minutes, the machine's start
# included): the whole script stays inside BUDGET_S (default 540 s) so a 10-minute call returns.
#
#   bash benchmarks/gpu_session.sh                         # on the GPU machine, from the repository root
#   GPU_SESSION_DRY_RUN=1 BUDGET_S=30 OUT=/tmp/s bash benchmarks/gpu_session.sh   # the budget logic on a CPU
#
# Steps, in order (each capped by its share of BUDGET_S and by what is left after the later steps' reserves):
#   build      pip install -e . with MAX_JOBS=16 and MMICT_KERNELS_CUDA_ARCHS=90a (the extension, sm_90a only)
#   tests      the GPU-only tests, -x: tests/ops/**/test_cuda*.py first, then the GPU-only Triton and module
#              tests (selected by their skip markers: tests/gpu_readiness/gpu_only_plugin.py)
#   memcheck   compute-sanitizer memcheck on scripts/sanitize_cuda.py (CUDA kernels, then Triton kernels if time is left)
#   racecheck  compute-sanitizer racecheck on scripts/sanitize_cuda.py --quick
#   bench      benchmarks/bench_hub.py --no-plot (its main rows first; the torch.compile'd peers last, cut off by the cap)
#   resources  the compile-only resource table of one scenario per kernel family (--smoke) with this machine's
#              Triton (the full table is made on a CPU: benchmarks/results/kernel_resources.csv); a time limit
#              still leaves the rows compiled until then
#   summary    the step table and the benchmark's summary (printed last)
#
# Knobs (environment): OUT (results folder, default ./gpu_out), BUDGET_S, BENCH_ARGS (extra bench_hub.py
# flags), SKIP_BUILD=1, SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_RESOURCES=1. Extra wheels (e.g. xformers)
# are installed from .whl/ when that folder is present.
# Dry run (GPU_SESSION_DRY_RUN=1): every GPU step is a stub that sleeps DRY_STEP_S (default 1) seconds and
# writes the files the real step writes; the steps named in DRY_SLOW_STEPS (comma list, or "all") sleep
# past their cap instead, so the caps and the reserves are exercised without a GPU; DRY_EXTRA_FILES=N makes
# the benchmark stub write N more files (as plots would), to exercise the 8-file limit.
# What comes back (at most 8 files): session.log (everything, the summary last), tests.xml, sanitizer.log,
# bench_hub_<device>.csv, bench_hub_<device>_unavailable.csv, kernel_resources_gpu_machine.csv,
# gpu_scenarios.json; anything else is packed into extra.tar.gz. Plots: benchmarks/plot.py on the CSV, anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
BUDGET_S="${BUDGET_S:-540}"
DRY="${GPU_SESSION_DRY_RUN:-0}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1
MAX_FILES=8

# Shares (percent of BUDGET_S) cap each step; reserves (percent) keep time for the steps after it.
# At 540 s: build <= 216 s, tests <= 135, memcheck <= 64, racecheck <= 54, bench: what is left,
# resources <= 64; reserves: tests 54, sanitizer 37, bench 86, resources 43, summary 16.
SHARE_BUILD=40 SHARE_TESTS=25 SHARE_MEMCHECK=12 SHARE_RACECHECK=10 SHARE_RESOURCES=12
RES_TESTS=10 RES_SANITIZER=7 RES_BENCH=16 RES_RESOURCES=8 RES_SUMMARY=3

pct() { echo $(( BUDGET_S * $1 / 100 )); }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
STATUS=()

# cap SHARE_PCT RESERVE_PCT: seconds a step may take (0: none left)
cap() {
    local share reserve t
    share=$(pct "$1"); reserve=$(pct "$2")
    t=$(( $(left) - reserve - 1 ))  # 1 s for the step's own start and bookkeeping
    [ "$share" -gt 0 ] && [ "$t" -gt "$share" ] && t=$share
    [ "$t" -lt 1 ] && t=0
    echo "$t"
}

is_slow() { [[ ",${DRY_SLOW_STEPS:-}," == *",$1,"* || "${DRY_SLOW_STEPS:-}" == all ]]; }

# run_step NAME SECONDS CMD...: runs CMD under `timeout` (its whole process group), records the outcome.
run_step() {
    local name=$1 t=$2 s rc
    shift 2
    echo
    echo "=== [$(elapsed)s] $name (cap ${t}s)"
    if [ "$t" -lt 1 ]; then
        STATUS+=("$(printf '%-10s skipped (no time left)' "$name")")
        return 0
    fi
    s=$(date +%s)
    if [ "$DRY" = 1 ]; then
        local sleep_s="${DRY_STEP_S:-1}"
        is_slow "$name" && sleep_s=$(( t + 60 ))
        timeout --kill-after=2 "$t" bash -c "sleep $sleep_s; $(printf '%q ' dry_outputs "$name")"
    else
        timeout --kill-after=10 "$t" "$@"
    fi
    rc=$?
    local took=$(( $(date +%s) - s ))
    case $rc in
        0) STATUS+=("$(printf '%-10s ok          %4ss' "$name" "$took")") ;;
        124 | 137) STATUS+=("$(printf '%-10s TIMED OUT   %4ss (cap %ss)' "$name" "$took" "$t")") ;;
        *) STATUS+=("$(printf '%-10s FAILED (%s) %4ss' "$name" "$rc" "$took")") ;;
    esac
    return 0
}

# The files each real step writes, for the dry run (its stub calls this after sleeping).
dry_outputs() {
    case $1 in
        tests) echo '<testsuite tests="0"/>' >"$OUT/tests.xml" ;;
        memcheck | racecheck) echo "dry run: $1" >>"$OUT/sanitizer.log" ;;
        bench) printf 'op,provider\nhub_cross_attention,triton\n' >"$OUT/bench_hub_dry.csv"
               printf 'op,provider,reason\n' >"$OUT/bench_hub_dry_unavailable.csv"
               for i in $(seq 1 "${DRY_EXTRA_FILES:-0}"); do echo "extra $i" >"$OUT/extra_$i.png"; done ;;
        resources) printf 'scenario,kernel\n' >"$OUT/kernel_resources_gpu_machine.csv"; echo '{}' >"$OUT/gpu_scenarios.json" ;;
    esac
}
export -f dry_outputs
export OUT

sanitize() {  # TOOL ARGS...: compute-sanitizer on the sanitizer script, its output appended to sanitizer.log
    local tool=$1
    shift
    echo "--- compute-sanitizer --tool $tool scripts/sanitize_cuda.py $*" >>"$OUT/sanitizer.log"
    compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 python3 scripts/sanitize_cuda.py "$@" \
        >>"$OUT/sanitizer.log" 2>&1
    local rc=$?
    tail -4 "$OUT/sanitizer.log"
    return $rc
}
memcheck_both() {  # the CUDA kernels, then the Triton kernels (as far as the cap allows)
    sanitize memcheck --backend cuda && sanitize memcheck --backend triton
}
export -f sanitize memcheck_both

keep_at_most_8_files() {
    local files extra=()
    mapfile -t files < <(find "$OUT" -maxdepth 1 -type f -printf '%f\n' | sort)
    if [ "${#files[@]}" -gt "$MAX_FILES" ]; then
        for f in "${files[@]}"; do
            case $f in
                session.log | tests.xml | sanitizer.log | bench_hub_*.csv | kernel_resources_gpu_machine.csv | gpu_scenarios.json) ;;
                *) extra+=("$f") ;;
            esac
        done
        if [ "${#extra[@]}" -gt 0 ]; then
            tar -czf "$OUT/extra.tar.gz" -C "$OUT" "${extra[@]}" && (cd "$OUT" && rm -f "${extra[@]}")
            echo "packed ${#extra[@]} extra files into extra.tar.gz (at most $MAX_FILES files come back)"
        fi
    fi
}

{
echo "=== [0s] machine (budget ${BUDGET_S}s$([ "$DRY" = 1 ] && echo ', DRY RUN: GPU steps stubbed'))"
if [ "$DRY" = 1 ]; then
    echo "dry run on $(hostname)"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    python3 -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && echo "extra wheels installed" || echo "extra wheels: FAILED"
    fi
fi

if [ "${SKIP_BUILD:-0}" = 1 ]; then
    STATUS+=("$(printf '%-10s skipped (SKIP_BUILD=1)' build)")
else
    run_step build "$(cap $SHARE_BUILD $(( RES_TESTS + RES_SANITIZER + RES_BENCH + RES_RESOURCES + RES_SUMMARY )))" \
        env MAX_JOBS=16 MMICT_KERNELS_CUDA_ARCHS=90a python3 -m pip install -e . --no-build-isolation --no-deps -q
    [ "$DRY" = 1 ] || python3 -c "import mmict_kernels as m; print('mmict_kernels._C built:', m.backends.cuda_extension_available())"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    run_step tests "$(cap $SHARE_TESTS $(( RES_SANITIZER + RES_BENCH + RES_RESOURCES + RES_SUMMARY )))" \
        env PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" python3 -m pytest -x -q -p no:cacheprovider \
        -p gpu_readiness.gpu_only_plugin --gpu-only --junitxml="$OUT/tests.xml" tests/
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
    run_step memcheck "$(cap $SHARE_MEMCHECK $(( RES_SANITIZER / 2 + RES_BENCH + RES_RESOURCES + RES_SUMMARY )))" bash -c memcheck_both
    run_step racecheck "$(cap $SHARE_RACECHECK $(( RES_BENCH + RES_RESOURCES + RES_SUMMARY )))" \
        bash -c 'sanitize racecheck --backend cuda --quick'
fi

# shellcheck disable=SC2086
run_step bench "$(cap 0 $(( RES_RESOURCES + RES_SUMMARY )))" python3 benchmarks/bench_hub.py --out "$OUT" --no-plot ${BENCH_ARGS:-}

if [ "${SKIP_RESOURCES:-0}" != 1 ]; then
    run_step resources "$(cap $SHARE_RESOURCES $RES_SUMMARY)" python3 -m mmict_kernels.testing.gpu_scenarios --smoke \
        --csv "$OUT/kernel_resources_gpu_machine.csv" --json "$OUT/gpu_scenarios.json" --fail-on-spill \
        --device-label "compile-only on the GPU machine"
fi

keep_at_most_8_files
{  # the summary, last
    echo
    echo "=== [$(elapsed)s] summary (budget ${BUDGET_S}s)"
    printf '%s\n' "${STATUS[@]}"
    if [ "$DRY" != 1 ]; then
        for csv in "$OUT"/bench_hub_*.csv; do
            case "$csv" in *_unavailable.csv) ;; *) [ -f "$csv" ] && timeout 20 python3 benchmarks/bench_results.py "$csv" ;; esac
        done
    fi
    echo "files in $OUT: $(find "$OUT" -maxdepth 1 -type f | wc -l) (at most $MAX_FILES); total $(elapsed)s of ${BUDGET_S}s"
}
} 2>&1 | tee "$LOG"
