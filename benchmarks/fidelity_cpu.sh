#!/usr/bin/env bash
# Issue 13's headline rows on this CPU, against demo/teacher (trained ~65 min on the same kind of 2-core VM):
# 2-step sCD with 20 % and 2-step sCT from the teacher's weights with 40 % of the teacher's wall-clock, unguided,
# for each training seed in SEEDS; each run evaluated at 1 and 2 steps, n = 2000, sample seeds 0 1 2; then its
# post-hoc EMA swept over σ_rel (2 steps). Run alone on the machine (the budgets are wall-clock).
#
#   SEEDS="0 1" bash benchmarks/fidelity_cpu.sh        # results: benchmarks/results/fidelity-cpu/
set -euo pipefail
cd "$(dirname "$0")/.."
SCM=${SCM:-.venv/bin/scm}
R=${RUNS:-benchmarks/runs/fidelity-cpu}
OUT=benchmarks/results/fidelity-cpu
TEACHER_MIN=${TEACHER_MIN:-65}
mkdir -p "$R" "$OUT"
common=(--data mnist --batch 128 --kimg 100000 progress=false tensorboard=false sample_every_kimg=None
        ckpt_every_kimg=1000 ema.snapshot_kimg=2.5)
scd_min=$(python3 -c "print(round(0.2 * $TEACHER_MIN, 1))")
sct_min=$(python3 -c "print(round(0.4 * $TEACHER_MIN, 1))")
for s in ${SEEDS:-0 1}; do
    [ -f "$R/scd-$s/checkpoints/latest" ] || $SCM train --preset tiny-28-scd --teacher demo/teacher --out "$R/scd-$s" \
        "${common[@]}" seed=$s max_minutes=$scd_min loss.P_mean=-0.8 loss.P_std=1.6
    [ -f "$R/sct-$s/checkpoints/latest" ] || $SCM train --preset tiny-28-sct --init demo/teacher --out "$R/sct-$s" \
        "${common[@]}" seed=$s max_minutes=$sct_min
done
for run in "$R"/*; do
    name=$(basename "$run")
    for e in 0 1 2; do
        [ -f "$OUT/$name-eval-$e.json" ] || $SCM eval --ckpt "$run" --ref mnist --steps 1 --steps 2 --n 2000 --seed $e \
            --out "$OUT/$name-eval-$e"
    done
    [ -f "$OUT/$name-ema/sweep.json" ] || $SCM ema sweep "$run" --ref mnist --steps 2 --n 1000 --seeds 0,1 \
        --out "$OUT/$name-ema"
done
