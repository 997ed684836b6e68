#!/usr/bin/env bash
# Video and audio at the image study's CPU budget: for each modality a class-conditional diffusion teacher trained
# TEACHER_MIN minutes on the built-in set (moving-mnist-tiny: 1-digit clips 8×32×32; spoken-digits: 1 s at 16 kHz),
# then its 2-step sCD student with 20 % and sCT from its weights with 40 % of that wall-clock (the shares of
# benchmarks/fidelity_cpu.sh), unguided. Each run is evaluated against the test split at 1 and 2 steps, the teacher
# with Heun 35 NFE, at sample seeds 0 1 2 (n per seed: N_VIDEO, N_AUDIO). The two modalities run side by side, one
# torch thread each, on the 2-core VM: run nothing else meanwhile (the budgets are wall-clock).
#
#   bash benchmarks/av_fidelity.sh && .venv/bin/python benchmarks/av_fidelity_report.py
#   ONLY=audio EXTRA=loss.sigma_d=0.5 OUT=… RUNS=… bash benchmarks/av_fidelity.sh   # one modality; an override for all
#   # results: benchmarks/results/av-fidelity/ (README.md, results.json, the eval files)
set -euo pipefail
cd "$(dirname "$0")/.."
SCM=${SCM:-.venv/bin/scm}
R=${RUNS:-benchmarks/runs/av-fidelity}
OUT=${OUT:-benchmarks/results/av-fidelity}
TEACHER_MIN=${TEACHER_MIN:-25}
mkdir -p "$R" "$OUT"
export OMP_NUM_THREADS=1
common=(--kimg 100000 conditional=true ${EXTRA:-} progress=false tensorboard=false sample_every_kimg=None ckpt_every_kimg=1000
        log_every=20)
scd_min=$(awk "BEGIN {print 0.2 * $TEACHER_MIN}")
sct_min=$(awk "BEGIN {print 0.4 * $TEACHER_MIN}")

modality() {  # name preset-prefix data n
    local name=$1 preset=$2 data=$3 n=$4 run
    [ -f "$R/$name-teacher/checkpoints/latest" ] || $SCM train --preset "$preset-diffusion" --data "$data" \
        --out "$R/$name-teacher" "${common[@]}" max_minutes="$TEACHER_MIN"
    [ -f "$R/$name-scd/checkpoints/latest" ] || $SCM train --preset "$preset-scd" --data "$data" \
        --teacher "$R/$name-teacher" --out "$R/$name-scd" "${common[@]}" max_minutes="$scd_min"
    [ -f "$R/$name-sct/checkpoints/latest" ] || $SCM train --preset "$preset-sct" --data "$data" \
        --init "$R/$name-teacher" --out "$R/$name-sct" "${common[@]}" max_minutes="$sct_min"
    for e in 0 1 2; do
        for run in scd sct; do
            [ -f "$OUT/$name-$run-eval-$e.json" ] || $SCM eval --ckpt "$R/$name-$run" --ref "$data:test" --steps 1 \
                --steps 2 --n "$n" --batch 100 --seed $e --out "$OUT/$name-$run-eval-$e"
        done
        [ -f "$OUT/$name-teacher-eval-$e.json" ] || $SCM eval --ckpt "$R/$name-teacher" --ref "$data:test" --nfe 35 \
            --n "$n" --batch 100 --seed $e --out "$OUT/$name-teacher-eval-$e"
    done
    for run in teacher scd sct; do  # the runs' settings and logs (throughput: the step cost; kimg reached)
        cp "$R/$name-$run/config.json" "$OUT/$name-$run-config.json"
        cp "$R/$name-$run/metrics.jsonl" "$OUT/$name-$run-metrics.jsonl"
    done
}

pids=()
case " ${ONLY:-video audio} " in *" video "*)
    modality video video-tiny-8x32 moving-mnist-tiny "${N_VIDEO:-300}" > "$R/video.log" 2>&1 & pids+=($!) ;; esac
case " ${ONLY:-video audio} " in *" audio "*)
    modality audio audio-tiny-16k spoken-digits "${N_AUDIO:-500}" > "$R/audio.log" 2>&1 & pids+=($!) ;; esac
for pid in "${pids[@]}"; do wait "$pid"; done
echo "done: $OUT"
