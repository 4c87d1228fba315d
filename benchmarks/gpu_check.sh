#!/usr/bin/env bash
# One-call GPU check for a scarce GPU slot: pre-flight, then every figure the planner and the
# docs need, each step under its own time limit, all within BUDGET_S (default 570 s = 9.5 min).
#
#   bash benchmarks/gpu_check.sh [OUT]          # from the repository root, project installed
#   SMOKE=1 bash benchmarks/gpu_check.sh [OUT]  # the same steps at tiny sizes, on CPU (CI)
#
# Prints `RESULT key value` lines as they come (also kept in OUT/results.txt); each step's log is
# OUT/<step>.log. A failing or timed-out step records `RESULT <step>_status failed|timeout` and
# the check goes on (no `set -e`: one failure must not lose every later figure). Exit status: 0
# when every step passed, 1 otherwise (2: the pre-flight found no usable GPU; nothing ran).
# BUDGET_S (seconds for the whole check) and STEP_LIMIT_SCALE (x each step's limit) override the
# limits, e.g. for SMOKE=1 on a loaded machine.
#
# Steps (benchmarks/gpu_steps.py): build (torch/CUDA), forward (backbone images/s at 768 and
# 1536 px in fp32/tf32/bf16), ncut (NCut+IPO ms per image, batch 32), eigh (batched float64 at
# k = 24…192, GPU vs CPU), h2d (pageable vs pinned GB/s), decode (decode+resize ms per image on
# one core), pipeline (pseudo-label images/s with the default plan, GPU use sampled), train (1
# worker, and 2 where 2 GPUs exist) and segment at the same size. docs/cluster.md says which
# RESULT lines replace the planner's assumed rates.
set -uo pipefail

OUT=${1:-gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
SMOKE=${SMOKE:-0}
export SMOKE
BUDGET_S=${BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 420 || echo 570)}
MIN_DRIVER=${MIN_DRIVER:-580}
# Multiplies every step's limit (a slow or loaded CPU machine running SMOKE=1).
STEP_LIMIT_SCALE=${STEP_LIMIT_SCALE:-1}
START=$SECONDS
FAILED=0
: > "$OUT/results.txt"

result() { echo "RESULT $1 $2" | tee -a "$OUT/results.txt"; }

# step NAME LIMIT_S SUBCOMMAND [ARGS...]: one gpu_steps.py subcommand in its own process, under
# `timeout` (never past the overall budget); its RESULT lines stream through as they come.
step() {
    local name=$1 limit=$(( $2 * STEP_LIMIT_SCALE ))
    shift 2
    local left=$(( BUDGET_S - (SECONDS - START) ))
    if [ "$left" -lt 15 ]; then
        result "${name}_status" skipped_out_of_time
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit} s)"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" python "$HERE/gpu_steps.py" "$@" --out "$OUT" \
        2> "$OUT/$name.log" | grep --line-buffered '^RESULT ' | tee -a "$OUT/results.txt"
    local rc=${PIPESTATUS[0]}
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=timeout
    elif [ "$rc" -ne 0 ]; then
        status=failed
        tail -n 5 "$OUT/$name.log" | sed 's/^/    /' >&2
    fi
    [ "$status" = ok ] || FAILED=1
    result "${name}_status" "$status"
    result "${name}_s" $(( SECONDS - t0 ))
}

echo "== pre-flight"
result cpu_count "$(nproc)"
result dev_shm_gib "$(df -BG --output=size /dev/shm 2>/dev/null | tail -n 1 | tr -dc 0-9)"
NGPU=0
if command -v nvidia-smi > /dev/null 2>&1 && \
        GPUS=$(timeout 30 nvidia-smi --query-gpu=index,name,driver_version,memory.total \
               --format=csv,noheader,nounits 2> "$OUT/nvidia-smi.log"); then
    while IFS=',' read -r index name driver memory; do
        index=${index// /}
        result "gpu${index}_name" "$(echo "$name" | sed 's/^ *//; s/ /_/g')"
        result "gpu${index}_driver" "${driver// /}"
        result "gpu${index}_memory_mib" "${memory// /}"
        NGPU=$(( NGPU + 1 ))
        major=${driver// /}
        major=${major%%.*}
        if [ "${major:-0}" -lt "$MIN_DRIVER" ]; then
            result preflight_driver_ok 0
            echo "driver $driver < $MIN_DRIVER: torch's CUDA 13.0 build cannot use this GPU" >&2
            [ "$SMOKE" = 1 ] || exit 2
        fi
    done <<< "$GPUS"
fi
result gpu_count "$NGPU"
if [ "$NGPU" -eq 0 ] && [ "$SMOKE" != 1 ]; then
    echo "no GPU answers nvidia-smi: nothing to check (SMOKE=1 runs the steps on CPU)" >&2
    exit 2
fi

step build 60 build
step forward 120 forward
step ncut 60 ncut
step eigh 60 eigh
step h2d 30 h2d
step decode 45 decode
step pipeline 150 pipeline
step train 120 train --workers 1
if [ "$NGPU" -ge 2 ]; then
    step train2 90 train --workers 2
fi
step segment 90 segment

result total_s $(( SECONDS - START ))
result all_ok $(( 1 - FAILED ))
echo "== done: $OUT/results.txt"
exit "$FAILED"
