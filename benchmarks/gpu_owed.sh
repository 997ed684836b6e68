#!/usr/bin/env bash
# The GPU figures the open work still owes, in one prepared script sized for a lent machine's 15 minutes of device
# time: two calls on the same warm machine (about 6.5 and 5.5 minutes, plus a start of a minute or two).
#
#   here, once:  bash benchmarks/gpu_wheels.sh       (.whl/, git-ignored: diffusers, jvp-flash-attention, starlette,
#                                                     uvicorn; the machine has torch, triton, peft, transformers)
#   device:      run(command="SECTIONS='1 2 3 4' BUDGET_S=390 bash benchmarks/gpu_owed.sh", carry=[".whl"],
#                    timeout_s=420)
#                then at once, on the still-warm machine:
#                run(command="SECTIONS='5 6 7 8' BUDGET_S=330 bash benchmarks/gpu_owed.sh", carry=[".whl"],
#                    timeout_s=360)
#   back here:   tar xzf /work/.device/…/gpu_owed.tgz -C benchmarks/results/gpu  (the files the device tool fetched)
#   dry run on the CPU (toy sizes, the same steps; about 6 minutes):  DEV=cpu bash benchmarks/gpu_owed.sh
#
# Sections, most important first; each is capped in time (capped in benchmarks/gpu_lib.sh) and its results packed
# as soon as it ends, so a call stopped at its limit still returns what finished:
#   1. kernels on CUDA: a check at the text networks' sizes (120 prompt tokens, some prompts all padding) against
#      float64 math: O, tangent, LSE, backward, fp32 and bf16 (benchmarks/kernel_check.py; if it fails, the later
#      sections run attention on the math path);
#   2. the captured sampler vs the eager one, bf16, batch 1 and 64, 1 and 2 steps: XXL U-Net (64×64×4) and
#      DiT-XL/2 (32×32×4), with their largest image difference, and the same steps captured by torch.cuda.CUDAGraph
#      directly (no compiler) beside them (benchmarks/gpu_captured.py);
#   3. the text DiT's training-step cost at DiT-XL/2-text size, 120-token prompts, bf16: diffusion, sCT, sCD (and
#      sCD with a guided teacher, its two evaluations in one call or two), time and peak memory; the variants share
#      one network on the card (benchmarks/step_cost.py); then where classifier-free guidance in one call pays on
#      the card (scm.generate stacks always on CUDA, unmeasured): both committed teachers, prompts and class labels
#      (benchmarks/cfg_one_call.py);
#   4. attention's JVP for training against the peer kernel jvp-flash-attention and SDPA math + forward AD,
#      N = 1k … 16k, d = 64 / 128, bf16 (benchmarks/attention_peer.py);
#   5. diffusers' text-to-image families at their real configurations, bf16: tangent pass / forward, sCD step /
#      teacher forward, memory, 1- and 2-step latency (benchmarks/t2i_cost.py --size real);
#   6. sCD memory and step time of SD3-medium- and Sana-1.6B-sized students at 1024² latents: full fine-tuning,
#      checkpointing, LoRA r=64, LoRA + checkpointing (the goal: under 80 GB at batch 16, so first), batch 16 then 4
#      (benchmarks/memory.py --size real);
#   7. `scm serve` on the GPU: latency percentiles of one client and of 20, a 2-step model of the demo's network
#      (the committed teacher's weights as an sCT run: no student is trained there), eager then captured
#      (benchmarks/serve_load.py --as-consistency [--captured]);
#   8. the attention kernels' launch configurations tuned on the card (block shapes, warps, stages), against the
#      goals of the forward within 1.2× SDPA's flash forward and the fused tangent at d = 128 within 2.5× per FLOP of
#      d = 64; the card's table comes back as attention_tuning.json (benchmarks/kernel_tune.py);
#   9. scm's attention kernel tests on CUDA (tests/test_attention_triton.py, test_attention_mask.py run the real
#      kernels where CUDA is; each shape compiles, so the cap may cut them short): not in the two calls above.
# A section gets what is left of BUDGET_S (less 30 s) when that is below its own cap, and is skipped under 30 s.
# Results: $OUT (the device tool's folder; default benchmarks/results/gpu): log.txt and gpu_owed.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-benchmarks/results/gpu}
NAME=gpu_owed
SECTIONS=${SECTIONS:-1 2 3 4 5 6 7 8 9}
BUDGET_S=${BUDGET_S:-720}
PY=${PY:-python3}
export DEV=${DEV:-cuda}
if [ "$DEV" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then  # what the machine lacks (benchmarks/gpu_wheels.sh)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site || echo "[gpu_owed] the wheels in .whl did not install: sections 4–7 may fail"
fi
source benchmarks/gpu_lib.sh
R=$WORK/results
mkdir -p "$R"
if [ "$DEV" = cuda ]; then
    CAPTURED=(--net img512-XXL-sct --net "dit-tiny-32-sct net_preset=DiT-XL/2 channels=4" --batch 1 --batch 64)
    TEXT_STEP=(--net DiT-XL/2-text --res 32 --channels 4 --batch 32 --text-tokens 120 --precision bf16 --repeats 5)
    PEER=(--budget-s 100); T2I=(--size real --budget-s 40 --total-budget-s 150)
    MEMORY=(--size real --batches 16,4 --variants 5,4,3,1,2 --repeats 2 --budget-s 110); SERVE=(--requests 20)
    TUNE=(--budget-s 130 --table "$R/attention_tuning.json"); CFG=(--batch 1 8 64 256 --precision bf16 --repeats 5)
else  # dry run on the CPU: the same steps at toy sizes
    CAPTURED=(--net "tiny-28-sct net.num_blocks=1" --batch 1 --repeats 1)
    TEXT_STEP=(--net dit-tiny-text --batch 2 --repeats 1)
    PEER=(--quick); T2I=(--size real --shrink --families pixart,sd3 --repeats 1)
    MEMORY=(--size tiny --nets sd3-like --batches 2 --variants 5,1 --repeats 1 --budget-s 40)
    SERVE=(--clients 2 --requests 2); TUNE=(--quick); CFG=(--batch 2 --repeats 1)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } |
    tee "$R/card.csv"
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0],
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" | tee -a "$WORK/log.txt"
for pkg in triton diffusers peft transformers jvp_flash_attention starlette uvicorn; do
    $PY -c "import importlib.metadata as m; print('$pkg', m.version('$pkg'))" 2>/dev/null || echo "$pkg: not installed"
done | tee -a "$WORK/log.txt"

kernels() {
    capped 120 $PY benchmarks/kernel_check.py $([ "$DEV" = cuda ] || echo --small) | tee "$R/kernel_check.txt"
}

kernel_tests() {  # the kernels' own tests, on CUDA where it is (each shape compiles: the cap may cut them short)
    capped 120 $PY -m pytest -q -p no:randomly -p no:cacheprovider tests/test_attention_mask.py \
        $([ "$DEV" = cuda ] && echo tests/test_attention_triton.py) 2>&1 | tail -5
}

tune() {
    capped 160 $PY benchmarks/kernel_tune.py "${TUNE[@]}" --out "$R" | tail -24
}

captured() {
    capped 200 $PY benchmarks/gpu_captured.py --device "$DEV" "${CAPTURED[@]}" --out "$R"
}

text_step() {
    capped 120 $PY benchmarks/step_cost.py --device "$DEV" "${TEXT_STEP[@]}" --name "step_cost-text-$DEV" |
        sed -n 1,16p && mv benchmarks/results/step_cost-text-"$DEV".* "$R/"
}

cfg_calls() {  # one guided call against two, for a text teacher and a class-conditional one
    for teacher in demo/text-teacher demo/teacher; do
        name=cfg_one_call-$(basename "$teacher")-$DEV
        capped 30 $PY benchmarks/cfg_one_call.py --teacher "$teacher" --device "$DEV" "${CFG[@]}" --name "$name" |
            tail -6 && mv benchmarks/results/"$name".* "$R/"
    done
}

peer() {
    capped 150 $PY benchmarks/attention_peer.py "${PEER[@]}" --out "$R" | tail -14
}

t2i() {
    capped 180 $PY benchmarks/t2i_cost.py --device "$DEV" "${T2I[@]}" --out "$R" | tail -20
}

memory() {
    capped 150 $PY benchmarks/memory.py --device "$DEV" "${MEMORY[@]}" --out "$R" | tail -16
}

serve() {  # eager, then captured (CUDA graphs), the same 2-step model
    capped 70 $PY benchmarks/serve_load.py --device "$DEV" --as-consistency "${SERVE[@]}" --name "serve_load-$DEV" |
        tail -12 && mv benchmarks/results/serve_load-"$DEV".* "$R/"
    capped 110 $PY benchmarks/serve_load.py --device "$DEV" --as-consistency --captured "${SERVE[@]}" \
        --name "serve_load-captured-$DEV" | tail -12 && mv benchmarks/results/serve_load-captured-"$DEV".* "$R/"
}

section "1. attention kernels on CUDA with key padding masks, at the text networks' sizes, vs float64 math" kernels ||
    { export SCM_ATTENTION=math; stamp "the networks' attention runs on the math path from here on (SCM_ATTENTION=math)"; }
section "2. captured vs eager sampler, bf16: XXL U-Net and DiT-XL/2" captured || true
section "3. DiT-XL/2-text training step, 120-token prompts, bf16" text_step || true
section "3. (cont.) classifier-free guidance in one call or two, on the card" cfg_calls || true
section "4. attention JVP: scm vs jvp-flash-attention vs SDPA math + forward AD" peer || true
section "5. diffusers text-to-image families at real size" t2i || true
section "6. sCD memory: full, checkpointing, LoRA, LoRA + checkpointing" memory || true
section "7. scm serve on the GPU: one client and 20" serve || true
section "8. the attention kernels' launch configurations, tuned on the card" tune || true
section "9. the attention kernels' tests on CUDA" kernel_tests || true
stamp "done"
pack
