#!/usr/bin/env bash
# The GPU figures of issue 8 in one go: bash benchmarks/gpu.sh [JOB ...] (default: all jobs).
#
# Jobs (each a benchmark script with its GPU settings; results in benchmarks/results/ as usual):
#   tests             pytest -m gpu tests/test_gpu.py: packing isolation per attention kernel, uint8
#                     pixels on the device, CUDA-graph decoding = eager, bf16 Lightning steps
#   generate          describe: batch-1 decode vs transformers generate, batch 16 vs batch 1
#   generate-compile  the same with the compiled static-cache decode step on both sides
#   mfu               model FLOPs/s over the measured bf16 matmul peak (small, compiled, 48 x 1024)
#   train             mmlm vs the plain loop, small preset, synthetic shapes
#   train-lognormal   the same on long-tailed caption lengths (samples up to 512 tokens, 196 of them
#                     the image's; packed rows of 1024, so that packing has room to pack)
#   train-flex        train-lognormal's packed modes with FlexAttention (block-sparse masks of the samples)
#   loader            images/s through the loader with 8 workers vs 8 x the PIL decode ceiling
#
# For a machine without webdataset: wheels in .whl/ (pip download webdataset braceexpand -d .whl)
# are installed into a temporary folder first (.whl/ is git-ignored: a copy of the working tree sent to
# the GPU machine must carry it). With $OUT set, the result files are copied there.
# Each job runs under `timeout ${JOB_TIMEOUT:-540}`; a failed job is reported and the rest go on.
set -u
cd "$(dirname "$0")/.."
if ! python3 -c "import webdataset" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-deps --no-index \
            --upgrade --target /tmp/mmlm-wd .whl/*.whl && export PYTHONPATH="/tmp/mmlm-wd:${PYTHONPATH:-}"
        if ! python3 -c "import webdataset, braceexpand" 2>/dev/null; then
            echo "webdataset is still not importable after installing .whl/*.whl into /tmp/mmlm-wd" >&2
            exit 2
        fi
    else
        echo "webdataset is missing and there are no wheels in .whl/" >&2
        exit 2
    fi
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
export TOKENIZERS_PARALLELISM=false

declare -A JOBS=(
    [tests]="-m pytest -p no:warnings -p no:cacheprovider -m gpu tests/test_gpu.py"
    [generate]="benchmarks/generate.py --preset small --device cuda --new-tokens 64 --repeats 3"
    [generate-compile]="benchmarks/generate.py --preset small --device cuda --new-tokens 64 --repeats 3 --compile"
    [mfu]="benchmarks/mfu.py --compile --batch-size 48"
    [train]="benchmarks/train_throughput.py --preset small --device cuda --steps 30 --repeats 3 --num-workers 8"
    [train-lognormal]="benchmarks/train_throughput.py --preset small --device cuda --steps 30 --repeats 3 --num-workers 8 --data lognormal --max-length 512 --pack-length 1024"
    [train-flex]="benchmarks/train_throughput.py --preset small --device cuda --steps 30 --repeats 3 --num-workers 8 --data lognormal --max-length 512 --pack-length 1024 --attn-implementation flex_attention --modes plain_packed mmlm --no-memory --out benchmarks/results/train_throughput-flex-$(date +%F).json"
    [loader]="benchmarks/loader.py --num-workers 8 --batches 60"
    [memory]="benchmarks/memory_estimate.py --device cuda --cases tiny-full tiny-lora clip-full small-instruct --batch-size 8 --seq-len 1024 --vocab 49152 --precision bf16-mixed"
)
ORDER=(tests generate generate-compile mfu train train-lognormal train-flex loader memory)
[ $# -gt 0 ] && ORDER=("$@")
for job in "${ORDER[@]}"; do  # every job name checked before anything runs
    if [ -z "${JOBS[$job]:-}" ]; then
        echo "unknown job $job; known: ${!JOBS[*]}" >&2
        exit 2
    fi
done

status=0
started=$(mktemp)  # result files newer than this one are this run's
for job in "${ORDER[@]}"; do
    cmd="${JOBS[$job]}"
    echo "=== $job: python3 $cmd"
    start=$(date +%s)
    # library warnings are dropped from the output; the benchmarks' own "warning: ..." lines are kept
    timeout "${JOB_TIMEOUT:-540}" python3 $cmd 2>&1 | grep -v -E "Warning|warnings\.warn" | tail -30
    rc=${PIPESTATUS[0]}
    echo "=== $job: exit $rc after $(( $(date +%s) - start )) s"
    [ "$rc" -ne 0 ] && status=1
done
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && find benchmarks/results -newer "$started" -type f -exec cp {} "$OUT/results/" \;
fi
rm -f "$started"
exit $status
