#!/usr/bin/env bash
# One check of the project on a lent GPU machine (H200: python3 3.12, torch 2.11 / CUDA 13.0, triton 3.6,
# nvcc 13.0, ninja, pybind11, pytest; no internet).
#
#   bash benchmarks/gpu_check.sh OUTDIR        (OUTDIR defaults to $OUT, else ./gpu_out)
#
# Stages (each under `timeout`, all within GPU_CHECK_BUDGET seconds, default 540; a failed stage does not
# stop the next one; a summary of the stages ends the log):
#   info       nvidia-smi, versions
#   wheels     if .whl/*.whl exist (e.g. diffusers and the pure-Python packages it imports), install them
#              with pip --no-index --no-deps into /tmp/site and put that first on PYTHONPATH
#   build      VLOPS_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e . (timed); if pip fails,
#              python3 setup.py build_ext --inplace
#   backends   python3 -m vlops (backend availability)
#   host       python3 benchmarks/host_overhead.py --device cuda (host time per call at tiny sizes;
#              GPU_HOST=skip leaves it out)
#   bench      python3 benchmarks/run.py --device cuda --out OUTDIR (all ops, full sizes)
#   tune       python3 benchmarks/contrastive_tune.py (the contrastive kernels one by one, tile variants,
#              cuBLAS products of the same shapes, one forward + backward at N = 1,048,576)
#   gpu-tests  python3 -m pytest -m gpu -q (every GPU-marked test, failures listed)
#
# GPU_BENCH_ARGS, GPU_TUNE_ARGS and GPU_TEST_ARGS add words to the bench, tune and gpu-tests commands (e.g.
# "--ops contrastive", "--huge 0", "tests/test_contrastive.py"); GPU_TUNE_ARGS=skip leaves the study out.
# GPU_TUNE_SCRIPT picks the study (default benchmarks/contrastive_tune.py; benchmarks/patch_embed_tune.py is
# the patch stem's, benchmarks/coattention_tune.py the co-attention's). GPU_TUNE_SCRIPTS runs several instead,
# one per stage (tune1, tune2, ...): entries separated by ';', each a script and its arguments, e.g.
# "benchmarks/patch_embed_tune.py --trials 3; benchmarks/coattention_tune.py --cases long"; GPU_TUNE_MAX is the
# time limit of each (default 150 s). GPU_TESTS_BACKGROUND=1 starts the gpu-tests stage right after the build, beside bench
# and tune (its output goes to OUTDIR/tests.txt and joins the log at the end): the tests' first minutes
# are Triton compiles on the CPU; their small kernels share the GPU with the timed runs while they last.
#
# Files written to OUTDIR (at most 8 come back): log.txt (everything), summary.txt, and the runner's
# <device>.csv, <device>.png, <device>.txt.
set -u

OUTDIR="${1:-${OUT:-gpu_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
LOG="$OUTDIR/log.txt"
BUDGET="${GPU_CHECK_BUDGET:-540}"
START=$(date +%s)
SUMMARY=()

# stage NAME MAX_SECONDS COMMAND...: run COMMAND under timeout (MAX_SECONDS, or what is left of the budget)
stage() {
    local name="$1" max="$2"
    shift 2
    local now left t s rc d status
    now=$(date +%s)
    left=$((START + BUDGET - now))
    t=$((max < left ? max : left))
    if ((t < 15)); then
        SUMMARY+=("$(printf '%-10s SKIPPED (budget spent)' "$name")")
        echo "=== [$name] skipped: ${left}s of the budget left"
        return 99
    fi
    echo
    echo "=== [$name] $(date -u +%H:%M:%S) timeout ${t}s: $*"
    s=$(date +%s)
    timeout -k 10 "$t" "$@"
    rc=$?
    d=$(($(date +%s) - s))
    case $rc in
        0) status="PASS" ;;
        124 | 137) status="TIMEOUT after ${t}s" ;;
        *) status="FAIL (exit $rc)" ;;
    esac
    SUMMARY+=("$(printf '%-10s %-22s %4ds' "$name" "$status" "$d")")
    echo "=== [$name] $status in ${d}s"
    return $rc
}

# the gpu-tests stage; in the background its summary line goes through OUTDIR/tests_summary.txt
run_tests() {
    # shellcheck disable=SC2086
    stage gpu-tests 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --maxfail=20 ${GPU_TEST_ARGS:-}
    printf '%s\n' "${SUMMARY[-1]}" >"$OUTDIR/tests_summary.txt"
}

main() {
    if ! command -v nvcc >/dev/null 2>&1; then  # the toolkit may sit in a versioned folder off PATH
        for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13; do
            if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d" PATH="$d/bin:$PATH"; break; fi
        done
    fi
    echo "vlops gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT -> $OUTDIR (budget ${BUDGET}s)"
    git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "(not a git checkout)"

    stage info 30 bash -c 'nvidia-smi; nvcc --version | tail -n 2; python3 --version;
        python3 -c "import torch, sys; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
            \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")";
        python3 -c "import triton; print(\"triton\", triton.__version__)";
        ninja --version; nproc; free -g | head -n 2'

    if compgen -G ".whl/*.whl" >/dev/null; then
        stage wheels 60 python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .whl/*.whl carried: the benchmark baseline will be reference-eager (no diffusers)"
    fi
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    for m in diffusers open_clip; do
        python3 -c "import $m; print('$m', $m.__version__)" 2>&1 | tail -n 1
    done

    export VLOPS_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INPUT=1
    stage build 240 python3 -m pip install --no-build-isolation --no-deps -e .
    rc=$?
    if ((rc != 0 && rc != 124 && rc != 137 && rc != 99)); then
        stage build_ext 200 python3 setup.py build_ext --inplace
    fi
    python3 -c "import vlops._C as c; print('vlops._C:', c.__file__, '| cuda part:', c.has_cuda())" ||
        echo "vlops._C: not importable"

    stage backends 60 python3 -m vlops
    [ "${GPU_HOST:-}" = skip ] || stage host 90 python3 benchmarks/host_overhead.py --device cuda
    local tests_pid=""
    if [ "${GPU_TESTS_BACKGROUND:-0}" = 1 ]; then
        (run_tests >"$OUTDIR/tests.txt" 2>&1) &
        tests_pid=$!
        echo "=== [gpu-tests] started in the background (pid $tests_pid), output in tests.txt"
    fi
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS / GPU_TEST_ARGS: extra words, e.g. "--ops contrastive"
    stage bench 200 python3 benchmarks/run.py --device cuda --out "$OUTDIR" --verbose ${GPU_BENCH_ARGS:-}
    if [ -n "${GPU_TUNE_SCRIPTS:-}" ]; then
        local i=0 entry
        IFS=';' read -ra tunes <<<"$GPU_TUNE_SCRIPTS"
        for entry in "${tunes[@]}"; do
            [ -z "${entry// /}" ] && continue
            i=$((i + 1))
            # shellcheck disable=SC2086  # the entry: a script and its arguments
            stage "tune$i" "${GPU_TUNE_MAX:-150}" python3 $entry
        done
    elif [ "${GPU_TUNE_ARGS:-}" != skip ]; then
        # shellcheck disable=SC2086
        stage tune "${GPU_TUNE_MAX:-150}" python3 "${GPU_TUNE_SCRIPT:-benchmarks/contrastive_tune.py}" ${GPU_TUNE_ARGS:-}
    fi
    if [ -n "$tests_pid" ]; then
        wait "$tests_pid"
        echo
        cat "$OUTDIR/tests.txt"
        [ -f "$OUTDIR/tests_summary.txt" ] && SUMMARY+=("$(cat "$OUTDIR/tests_summary.txt")")
    else
        run_tests
    fi
    echo
    echo "=== summary ($(($(date +%s) - START))s of ${BUDGET}s)"
    printf '%s\n' "${SUMMARY[@]}" | tee "$OUTDIR/summary.txt"
    ls -la "$OUTDIR"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
