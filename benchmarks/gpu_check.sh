#!/usr/bin/env bash
# GPU check: the first figures on a real accelerator; installs nothing. On a lent GPU machine, from the repo root,
# with MNIST carried along (the machine cannot download it):
#
#   here:   mkdir -p .gpu-data && cp -r ~/.cache/scm/{mnist,classifiers,refs} .gpu-data/   (git-ignored; MNIST, its
#           FD-MNIST classifier and reference statistics, made by `make demo`)
#   device: run(command="SECTIONS='1 2 3 4' bash benchmarks/gpu_check.sh", carry=[".gpu-data"], timeout_s=540)
#           then at once, on the still-warm machine:
#           run(command="SECTIONS=5 BUDGET_S=270 bash benchmarks/gpu_check.sh", carry=[".gpu-data"], timeout_s=330)
#   here, a dry run of this script on the CPU (toy sizes, a few minutes):  DEV=cpu bash benchmarks/gpu_check.sh
#
# Measured on an H200 (2026-11-27): sections 1a 27 s, 1b 141 s (mostly Triton compiling each shape), 2 81 s, 3 175 s,
# 4 37 s; section 5 takes what BUDGET_S leaves after the sections before it in the same call, less 100 s.
#
# Sections, each on its own (a failure is logged and the next one runs), most important first:
#   1. correctness on the GPU: the tiny net's JVP (forward_ad, torch.func, fp32 and bf16 autocast) against a float64
#      central difference; the Triton attention kernels (O, tangent, LSE, backward) against float64 math;
#   2. sampling time per image, bf16, batch 1 and 64: XXL U-Net on 64×64×4 latents and DiT-XL/2 on 32×32×4, 1 and
#      2 steps vs Heun 35 NFE on the same net (benchmarks/sampling_speed.py);
#   3. tangent pass / forward and training-step costs (diffusion, sCT, sCD; with peak memory) in bf16 for the `cifar`
#      U-Net (32×32×3) and DiT-B/2 (32×32×4), batch 128 (benchmarks/jvp_cost.py, benchmarks/step_cost.py);
#   4. the attention tangent: fused Triton kernel vs the math path (benchmarks/attention_jvp.py);
#   5. MNIST on the GPU: teacher → sCD and sCT → FD-MNIST, in the time that is left of BUDGET_S (default 480 s).
# Results go to $OUT (the device tool's folder; default benchmarks/results/gpu): log.txt and gpu_check.tgz, both
# rewritten after every section, so that what finished comes back even when the run is stopped at its limit.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-benchmarks/results/gpu}
NAME=gpu_check
SECTIONS=${SECTIONS:-1 2 3 4 5}
BUDGET_S=${BUDGET_S:-480}
source benchmarks/gpu_lib.sh
export SCM_DATA_DIR=${SCM_DATA_DIR:-$PWD/.gpu-data}
export DEV=${DEV:-cuda}
PY=${PY:-python3}
if [ "$DEV" = cuda ]; then
    SMALL=0; BATCH=128; NETS=(--net XXL:64:4 --net DiT-XL/2:32:4); SAMPLE=(); COST=(cifar:32:3 DiT-B/2:32:4); N=2000
else  # dry run of this script on the CPU: the same steps at toy sizes
    SMALL=1; BATCH=4; NETS=(--net tiny:16:4 --net dit-tiny:16:4); COST=(tiny:16:3 dit-tiny:16:4); N=200
    SAMPLE=(--batch 1 --batch 2 --heun-steps 3 --repeats 1 --heun-repeats 1); BUDGET_S=${BUDGET_S_DRY:-200}
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee "$WORK/card.csv"
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0],
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" | tee -a "$WORK/log.txt"

jvp_check() {
    $PY - <<'EOF' | tee "$WORK/jvp_check.txt"
import os, torch
from scm.nets import build_net, net_config
from scm.tangents import jvp_tangent
dev = torch.device(os.environ["DEV"])
torch.manual_seed(0)
net = build_net(net_config("tiny", img_resolution=32, img_channels=3), 0.5).to(dev)
net.out_gain.data.fill_(1.0)
x = 0.5 * torch.randn(16, 3, 32, 32, device=dev); t = torch.rand(16, device=dev) * 1.5 + 0.03; v = torch.randn_like(x)
_, a = jvp_tangent(net, x, t, v, 0.5)
_, b = jvp_tangent(net, x, t, v, 0.5, method="func")
_, c = jvp_tangent(net.double(), x.double(), t.double(), v.double(), 0.5, method="finite_difference")
net.float()
with torch.autocast(dev.type, dtype=torch.bfloat16):
    _, d = jvp_tangent(net, x, t, v, 0.5)
    _, e = jvp_tangent(net, x, t, v, 0.5, precision=torch.float32)
rel = lambda p, q: float((p.double() - q.double()).norm() / q.double().norm())
print(f"forward_ad vs func: {rel(a, b):.2e}; fp32 vs float64 central difference: {rel(a, c):.2e}; "
      f"bf16 autocast: {rel(d, c):.2e}; fp32 tangents inside bf16 autocast: {rel(e, c):.2e}")
assert rel(a, b) < 1e-5 and rel(a, c) < 1e-3 and rel(e, c) < 1e-3
EOF
}

attention_check() {
    [ "$DEV" = cuda ] || { echo "skipped: the layer's kernel path needs CUDA (the tests cover the kernels in the interpreter)"; return 0; }
    $PY benchmarks/kernel_check.py | tee "$WORK/attention_triton_check.txt"
}

sampling_speed() {
    $PY benchmarks/sampling_speed.py --device "$DEV" "${NETS[@]}" "${SAMPLE[@]}" --name "sampling_speed-$DEV" &&
        cp benchmarks/results/sampling_speed-"$DEV".* "$WORK/"
}

costs() {
    local spec preset res ch stem rc=0
    for spec in "${COST[@]}"; do
        IFS=: read -r preset res ch <<<"$spec"
        stem=$(echo "$preset" | tr -d /)-bf16-$DEV
        $PY benchmarks/jvp_cost.py --device "$DEV" --preset "$preset" --res "$res" --channels "$ch" --batch "$BATCH" \
            --precision bf16 --repeats $((SMALL ? 2 : 10)) --name "jvp_cost-$stem" | sed -n 1,12p || rc=1
        $PY benchmarks/step_cost.py --device "$DEV" --net "$preset" --res "$res" --channels "$ch" --batch "$BATCH" \
            --precision bf16 --repeats $((SMALL ? 2 : 6)) --name "step_cost-$stem" | sed -n 1,12p || rc=1
        cp benchmarks/results/jvp_cost-"$stem".* benchmarks/results/step_cost-"$stem".* "$WORK/" || rc=1
    done
    return $rc
}

attention_speed() {
    if [ "$DEV" = cuda ]; then
        $PY benchmarks/attention_jvp.py --device cuda --repeats 10 --name attention_jvp-cuda | tail -16 &&
            cp benchmarks/results/attention_jvp-cuda.* "$WORK/"
    else
        $PY benchmarks/attention_jvp.py --quick --out "$WORK" | tail -6
    fi
}

mnist() {
    local left=$(( BUDGET_S - $(elapsed) - 100 ))   # 100 s: three evaluations and the process start-ups
    if [ $left -lt 40 ]; then echo "skipped: only $left s left of BUDGET_S=$BUDGET_S"; return 0; fi
    local teacher student
    teacher=$(awk "BEGIN{printf \"%.2f\", $left * 0.5 / 60}"); student=$(awk "BEGIN{printf \"%.2f\", $left * 0.25 / 60}")
    echo "training minutes: teacher $teacher, sCD $student, sCT $student"
    local runs=$WORK/runs common=(--data mnist --batch 256 progress=false tensorboard=false sample_count=64 --device "$DEV")
    [ $SMALL = 1 ] || common+=(net.model_channels=64)
    $PY -m scm train --preset tiny-28-diffusion --out "$runs/teacher" --kimg 100000 "${common[@]}" \
        max_minutes="$teacher" optim.lr=5e-3 optim.lr_decay_kimg=200 optim.lr_rampup_kimg=10 2>&1 | tail -2 &&
    $PY -m scm train --preset tiny-28-scd --out "$runs/scd" --teacher "$runs/teacher" --kimg 100000 "${common[@]}" \
        max_minutes="$student" 2>&1 | tail -1 &&
    $PY -m scm train --preset tiny-28-sct --out "$runs/sct" --init "$runs/teacher" --kimg 100000 "${common[@]}" \
        max_minutes="$student" 2>&1 | tail -1 || return 1
    for r in teacher scd sct; do cp "$runs/$r/metrics.jsonl" "$WORK/metrics-$r.jsonl"; done
    local ev=(--ref mnist --n "$N" --device "$DEV")
    $PY -m scm eval --ckpt "$runs/teacher" --nfe 35 --nfe 3 "${ev[@]}" --out "$WORK/eval-teacher" | tail -4 &&
    $PY -m scm eval --ckpt "$runs/scd" --steps 1 --steps 2 "${ev[@]}" --out "$WORK/eval-scd" | tail -4 &&
    $PY -m scm eval --ckpt "$runs/sct" --steps 1 --steps 2 "${ev[@]}" --out "$WORK/eval-sct" | tail -4
}

section "1a. JVP on the device: forward_ad vs torch.func vs float64 central difference (fp32, bf16 autocast)" jvp_check || true
section "1b. attention kernels (Triton) vs float64 math: O, tangent, LSE, backward (fp32, bf16)" attention_check ||
    { export SCM_ATTENTION=math; stamp "the networks' attention runs on the math path from here on (SCM_ATTENTION=math)"; }
section "2. sampling time per image: 1/2 steps vs Heun 35 NFE, bf16" sampling_speed || true
section "3. tangent-pass and training-step costs, bf16, batch $BATCH: ${COST[*]}" costs || true
section "4. attention tangent: fused Triton kernel vs math path" attention_speed || true
section "5. MNIST on the device: teacher → sCD, sCT → FD-MNIST" mnist || true
stamp "done"
pack
