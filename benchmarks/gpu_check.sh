#!/usr/bin/env bash
# The one prepared device check: install ramtag on a bare GPU machine, run every CUDA-marked test, then the
# throughput benchmark (eager, then its --compile arms in a step of their own) and the training-memory benchmark,
# and leave their JSON (at most 8 files) in $OUT.
#
#   benchmarks/gpu_check.sh              on the GPU machine (the device tool's `run`, with .device-wheels carried)
#   benchmarks/gpu_check.sh --dry-run    anywhere: tiny sizes on the CPU, so the script cannot rot (CI runs it)
#
# Budget on the device: about 8 minutes in all (each step has its own timeout, and none may run past 540 s from
# the start, RAMTAG_GPU_CHECK_BUDGET_S), so that 15 minutes of GPU time leave room for a rerun. Steps never stop the script: each one's exit status goes into summary.json, and the
# script exits non-zero if any step failed.
#
# Before running it on the device (see ../shared/device.md):
#   mkdir -p .device-wheels && cp ../shared/device-wheels/*.whl .device-wheels/   (.device-wheels is git-ignored)
#   run: command "bash benchmarks/gpu_check.sh", carry [".device-wheels"]
# A rerun can leave out steps that already passed: RAMTAG_GPU_CHECK_SKIP="cuda_tests train_memory" bash ...
set -u
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
# The step limits guard the device budget. A dry run on a shared CPU is only slower, never billed: it gets four
# times the time, so a loaded machine does not fail a check that is there to catch rot.
LIMIT_SCALE=1
if [[ $DRY == 1 ]]; then LIMIT_SCALE=4; fi
OUT="${OUT:-$(mktemp -d -t ramtag-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAMTAG_BENCH_RESULTS="$OUT"
export RAMTAG_CUDA_REPORT="$OUT/cuda_report.json"
declare -A STATUS

SKIP=" ${RAMTAG_GPU_CHECK_SKIP:-} "  # e.g. "cuda_tests train_memory": a rerun spends its minutes on the rest
# The whole check's budget: the step limits add up to more than it (they only catch hangs), so a step is cut to
# what is left, and one that would get under 20 s is not started (exit 125 in summary.json: not run, no time).
BUDGET=$((${RAMTAG_GPU_CHECK_BUDGET_S:-540} * LIMIT_SCALE))
step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, record its status
    local name="$1" limit=$(($2 * LIMIT_SCALE))
    shift 2
    if [[ $SKIP == *" $name "* ]]; then
        echo "== $name: skipped (RAMTAG_GPU_CHECK_SKIP)" | tee -a "$LOG"
        return
    fi
    local left=$((BUDGET - SECONDS - 15))  # 15 s kept for the summary
    if ((left < 20)); then
        STATUS[$name]="125 0"
        echo "== $name: not run, ${SECONDS}s of the ${BUDGET}s budget spent" | tee -a "$LOG"
        return
    fi
    if ((limit > left)); then limit=$left; fi
    local started=$SECONDS
    echo "== $name (limit ${limit}s): $*" >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    STATUS[$name]="$rc $((SECONDS - started))"
    echo "== $name: exit $rc after $((SECONDS - started))s" | tee -a "$LOG"
}

echo "ramtag gpu_check: dry run $DRY, results in $OUT" | tee "$LOG"
if ! "$PY" -c "import open_clip, webdataset" 2>/dev/null; then
    step install 120 bash -c "$PY -m pip install -q --no-index --find-links .device-wheels open_clip_torch webdataset \
        && $PY -m pip install -q --no-deps --no-build-isolation -e ."
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
fi
step environment 60 "$PY" -c "
import torch, torchvision, ramtag
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ramtag', ramtag.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
"

CUDA_TESTS=(tests/test_cuda.py tests/data/test_device_decode.py tests/engine/test_tag_device_decode.py)
if [[ $DRY == 1 ]]; then
    DEVICE=cpu
    export RAMTAG_BENCH_TINY=1  # benchmarks build a 12-layer CLIP of tiny width instead of ViT-B/16
    TESTS=(-m cuda "${CUDA_TESTS[@]}")  # all skip on a CPU: they must still collect
    THROUGHPUT=(--quick --device cpu --models vitb --vitb-images 16 --repeats 1 --cli)  # (--other-decode: next step)
    # dynamo's tracing only (backend eager): inductor's code generation would triple the dry run on a CPU
    COMPILE=(--quick --device cpu --models vitb --variants vitb_adapters --vitb-images 16 --repeats 1
             --no-breakdown --other-decode --compile --compile-backend eager --label compile)
    MEMORY=(--quick --device cpu --rounds 1 --arms adapters,whole)
else
    DEVICE=cuda
    TESTS=(-m cuda "${CUDA_TESTS[@]}")
    THROUGHPUT=(--device cuda --precision auto --models vitb,demo --repeats 3 --cli)
    # The issue's model only, against its own eager arms: --compile (one inductor compile of ViT-B/16 is tens of
    # seconds) and `ramtag tag` with CPU decoding (PIL in one worker per core but one) beside GPU decoding. Kept
    # out of the step above, whose three models would not leave the time for both.
    COMPILE=(--device cuda --precision auto --models vitb --variants vitb_adapters --repeats 3 --no-breakdown
             --other-decode --compile --label compile)
    MEMORY=(--device cuda --rounds 1)
fi

step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}"

UTIL_PID=""
if [[ $DEVICE == cuda ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 250 >"$OUT/gpu_utilisation.csv" &
    UTIL_PID=$!
fi
step tag_throughput 210 "$PY" benchmarks/tag_throughput.py "${THROUGHPUT[@]}"
if [[ -n $UTIL_PID ]]; then kill "$UTIL_PID" 2>/dev/null; fi
step tag_compile 150 "$PY" benchmarks/tag_throughput.py "${COMPILE[@]}"
step train_memory 90 "$PY" benchmarks/train_memory.py "${MEMORY[@]}"

# --quick runs write under the temp folder unless RAMTAG_BENCH_RESULTS says otherwise (it does: $OUT).
"$PY" - "$OUT/summary.json" "$DRY" "$DEVICE" "${!STATUS[@]}" <<EOF
import json, sys
path, dry, device, *names = sys.argv[1:]
status = {$(for k in "${!STATUS[@]}"; do printf '"%s": "%s", ' "$k" "${STATUS[$k]}"; done)}
steps = {name: {"exit": int(value.split()[0]), "seconds": int(value.split()[1])} for name, value in status.items()}
json.dump({"dry_run": dry == "1", "device": device, "steps": steps}, open(path, "w"), indent=2)
print(json.dumps(steps))
EOF
FAILED=0
for name in "${!STATUS[@]}"; do
    if [[ ${STATUS[$name]%% *} != 0 ]]; then FAILED=1; fi
done
echo "ramtag gpu_check: done in ${SECONDS}s, failed=$FAILED; files: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED
