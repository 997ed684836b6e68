#!/usr/bin/env bash
# The fidelity study's from-scratch curve on this CPU: sCT from scratch (the paper's CIFAR-10 setting) and a diffusion teacher
# trained with demo/teacher's own command, side by side, one core each, for the teacher's budget (TEACHER_MIN, demo/
# teacher's 65 minutes), checkpointing along the way; then 1- and 2-step quality (sCT) and Heun-35 quality (teacher)
# against wall-clock. Both are class-conditional and evaluated unguided. Run alone on the machine.
#
#   bash benchmarks/fidelity_curve.sh        # runs: benchmarks/runs/fidelity-curve/, results: benchmarks/results/fidelity-cpu/curve/
set -euo pipefail
cd "$(dirname "$0")/.."
SCM=${SCM:-.venv/bin/scm}
PY=${PY:-.venv/bin/python}
R=${RUNS:-benchmarks/runs/fidelity-curve}
OUT=benchmarks/results/fidelity-cpu/curve
TEACHER_MIN=${TEACHER_MIN:-65}
N=${N:-1000}
mkdir -p "$R" "$OUT"
common=(--data mnist --batch 128 --kimg 100000 progress=false tensorboard=false sample_every_kimg=None
        keep_ckpts=1000 conditional=true max_minutes=$TEACHER_MIN)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
pids=()
[ -f "$R/teacher/checkpoints/latest" ] || { $SCM train --preset tiny-28-diffusion --out "$R/teacher" "${common[@]}" \
    net.label_dropout=0.1 optim.lr=5e-3 optim.lr_decay_kimg=50 optim.lr_rampup_kimg=5 ema.stds=0.05,0.1 \
    ckpt_every_kimg=15 > "$R/teacher.log" 2>&1 & pids+=($!); }
[ -f "$R/sct-scratch/checkpoints/latest" ] || { $SCM train --preset tiny-28-sct --out "$R/sct-scratch" "${common[@]}" \
    ema.stds=0.05,0.1 ckpt_every_kimg=5 t_mid=1.1 > "$R/sct-scratch.log" 2>&1 & pids+=($!); }  # the paper's t_mid
for p in "${pids[@]}"; do wait "$p"; done
unset OMP_NUM_THREADS MKL_NUM_THREADS
[ "${STAGE:-all}" = train ] && exit 0
# evaluation (both cores), n = N per sample seed: five checkpoints of sCT and three of the teacher spread
# geometrically over the training (always the last); sCT at 1 and 2 steps, sample seeds 0 1 2; the teacher at Heun-35
# (35 NFE per image, 2.6 min per 1000 on this VM), sample seed 0 only (TEACHER_SEEDS); then each run's post-hoc EMA
# sweep at its final time (the teacher's with one sample seed, at Heun 17 NFE to halve its cost)
for run in sct-scratch teacher; do
    points=$([ $run = teacher ] && echo 3 || echo 5)
    for step in $($PY -c "
import pathlib, numpy as np
steps = sorted(int(p.name) for p in pathlib.Path('$R/$run/checkpoints').glob('0*'))
want = np.geomspace(steps[0], steps[-1], $points)
print(*(f'{s:09d}' for s in sorted({min(steps, key=lambda s: abs(s - w)) for w in want})))"); do
        # a run directory whose latest checkpoint is this one (scm eval reads a run's latest)
        ck=$(mktemp -d)
        mkdir "$ck/checkpoints"
        cp "$R/$run/config.json" "$ck/"
        ln -s "$(realpath "$R/$run/checkpoints/$step")" "$ck/checkpoints/$step"
        echo "$step" > "$ck/checkpoints/latest"
        seeds=$([ $run = teacher ] && echo "${TEACHER_SEEDS:-0}" || echo 0 1 2)
        for e in $seeds; do
            f="$OUT/$run-$step-eval-$e"
            [ -f "$f.json" ] && continue
            if [ $run = teacher ]; then
                $SCM eval --ckpt "$ck" --ref mnist --nfe 35 --n "$N" --seed $e --out "$f"
            else
                $SCM eval --ckpt "$ck" --ref mnist --steps 1 --steps 2 --n "$N" --seed $e --out "$f"
            fi
        done
        rm -rf "$ck"
    done
done
[ -f "$OUT/sct-scratch-ema/sweep.json" ] || $SCM ema sweep "$R/sct-scratch" --ref mnist --steps 2 --n "$N" \
    --seeds 0,1 --out "$OUT/sct-scratch-ema"
[ -f "$OUT/teacher-ema/sweep.json" ] || $SCM ema sweep "$R/teacher" --ref mnist --nfe 17 --n "$N" --seeds 0 \
    --sigma-rels 0.03,0.05,0.1 --out "$OUT/teacher-ema"
