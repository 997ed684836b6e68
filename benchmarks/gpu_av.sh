#!/usr/bin/env bash
# Video and audio on a lent GPU: the larger presets' training-step cost (diffusion, sCT, sCD; peak memory) and
# sampling latency (1 and 2 steps against Heun 35 NFE), bf16. Installs nothing; needs only torch (and triton for
# the attention kernels, which the GPU machine has).
#
#   device: run(command="bash benchmarks/gpu_av.sh", timeout_s=540)     results: $OUT (default benchmarks/results/gpu)
#   here, a dry run at toy sizes on the CPU (a few minutes):  DEV=cpu bash benchmarks/gpu_av.sh
#
#   1. step cost: `video-S` on 1×20×64×64 clips (2560 tokens, factorised attention), batch 8; `audio-B` on
#      16,000-sample waveforms, batch 32 (benchmarks/step_cost.py);
#   2. sampling: the same networks, batch 1 and 16 (benchmarks/sampling_speed.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1
DEV=${DEV:-cuda}
PY=${PY:-python3}
if [ "$DEV" = cuda ]; then
    VIDEO=(--net video-S --res 64 --batch 8); AUDIO=(--net audio-B --batch 32); PREC=bf16; TAG=gpu
    SAMPLE=(--net video-S:64:1 --net audio-B:32:1 --batch 1 --batch 16)
else  # dry run: the same steps at toy sizes
    VIDEO=(--net video-tiny --res 32 --batch 2 --repeats 1); AUDIO=(--net audio-tiny --batch 2 --repeats 1)
    PREC=fp32; TAG=dry; SAMPLE=(--net video-tiny:32:1 --net audio-tiny:32:1 --batch 1 --heun-steps 3 --repeats 1
                                 --heun-repeats 1)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
    | tee "$OUT/gpu_av-card.csv"
status=0
$PY benchmarks/step_cost.py "${VIDEO[@]}" --device "$DEV" --precision $PREC --name "gpu/step_cost-video-S-$TAG" \
    || status=1
$PY benchmarks/step_cost.py "${AUDIO[@]}" --device "$DEV" --precision $PREC --name "gpu/step_cost-audio-B-$TAG" \
    || status=1
$PY benchmarks/sampling_speed.py "${SAMPLE[@]}" --device "$DEV" --precision $PREC --name "gpu/sampling_speed-av-$TAG" \
    || status=1
[ "$OUT" = benchmarks/results/gpu ] || cp benchmarks/results/gpu/*-av-"$TAG".* benchmarks/results/gpu/*-B-"$TAG".* \
    benchmarks/results/gpu/*-S-"$TAG".* "$OUT"/ 2>/dev/null
exit $status
