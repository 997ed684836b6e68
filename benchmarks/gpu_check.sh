#!/usr/bin/env bash
# GPU check (at most ~12 minutes; installs nothing from the network). Run on a lent GPU machine from the repo
# root, with MNIST carried along (the machine cannot download it):
#
#   here:   mkdir -p .gpu-data/mnist && cp ~/.cache/scm/mnist/mnist.npz .gpu-data/mnist/   (.gpu-data is git-ignored)
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-data"], timeout_s=780)
#
# It writes two files to $OUT (the device tool returns at most 8): log.txt and gpu_check.tgz with the card, a numerical JVP check on the GPU,
# the tangent-pass and training-step costs, the MNIST pipeline with a larger net and budget (teacher → sCD and
# sCT → FD-MNIST), and 2-step sampling time of the XXL preset on 64×64×4 latents (random weights, bf16, batch 1
# and 64; the paper's blog quotes 0.11 s per image for its 1.5B model on an A100).
set -euo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-benchmarks/results/gpu}
mkdir -p "$FINAL"
OUT=$(mktemp -d)   # everything is collected here, then packed into $FINAL/gpu_check.tgz
export OUT
trap 'tar czf "$FINAL/gpu_check.tgz" -C "$OUT" . ; cp "$OUT/log.txt" "$FINAL/log.txt" 2>/dev/null || true' EXIT
export PYTHONPATH=$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1
export SCM_DATA_DIR=${SCM_DATA_DIR:-$PWD/.gpu-data}
PY=${PY:-python3}
START=$(date +%s)
stamp() { echo "[gpu_check] $(( $(date +%s) - START )) s: $*" | tee -a "$OUT/log.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.csv"
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], torch.cuda.get_device_name(0))" | tee -a "$OUT/log.txt"

stamp "JVP check on the GPU (tiny net: forward_ad vs torch.func vs central difference; fp32 and bf16 autocast)"
$PY - <<'EOF' 2>&1 | tee "$OUT/jvp_check.txt"
import math, torch
from scm.nets import build_unet
from scm.tangents import jvp_tangent
dev = torch.device("cuda")
torch.manual_seed(0)
net = build_unet("tiny", 32, 3).to(dev)
net.out_gain.data.fill_(1.0)
x = 0.5 * torch.randn(16, 3, 32, 32, device=dev); t = torch.rand(16, device=dev) * 1.5 + 0.03; v = torch.randn_like(x)
_, a = jvp_tangent(net, x, t, v, 0.5)
_, b = jvp_tangent(net, x, t, v, 0.5, method="func")
_, c = jvp_tangent(net.double(), x.double(), t.double(), v.double(), 0.5, method="finite_difference")
net.float()
with torch.autocast("cuda", dtype=torch.bfloat16):
    _, d = jvp_tangent(net, x, t, v, 0.5)
    _, e = jvp_tangent(net, x, t, v, 0.5, precision=torch.float32)
rel = lambda p, q: float((p.double() - q.double()).norm() / q.double().norm())
print(f"forward_ad vs func: {rel(a, b):.2e}; fp32 vs float64 central difference: {rel(a, c):.2e}; "
      f"bf16 autocast: {rel(d, c):.2e}; fp32 tangents inside bf16 autocast: {rel(e, c):.2e}")
assert rel(a, b) < 1e-5 and rel(a, c) < 1e-3 and rel(e, c) < 1e-3
EOF

stamp "tangent-pass and step costs"
$PY benchmarks/jvp_cost.py --device cuda --batch 64 --res 32 --channels 3 --name jvp_cost-cuda --repeats 20 | tail -8
$PY benchmarks/step_cost.py --device cuda --batch 64 --res 32 --channels 3 | tail -9
cp benchmarks/results/jvp_cost-cuda.* benchmarks/results/step_cost-cuda.* "$OUT/"

stamp "XXL preset, 64×64×4 latents: 2-step sampling time (random weights, bf16)"
$PY - <<'EOF' 2>&1 | tee "$OUT/xxl_sampling.txt"
import json, os, time, torch
from scm.nets import build_unet
from scm.sampling import consistency_sample, consistency_times
dev = torch.device("cuda")
with torch.device(dev):
    net = build_unet("XXL", 64, 4, label_dim=1000, guidance_embed=True).eval()
print(f"XXL: {net.num_parameters() / 1e6:.1f} M parameters")
ts = consistency_times(2)
rows = {}
for batch in (1, 64):
    noise = 0.5 * torch.randn(batch, 4, 64, 64, device=dev)
    labels = torch.randint(0, 1000, (batch,), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            consistency_sample(net, noise, ts, 0.5, labels=labels, guidance=1.3)
        torch.cuda.synchronize(); t0 = time.perf_counter(); reps = 10
        for _ in range(reps):
            consistency_sample(net, noise, ts, 0.5, labels=labels, guidance=1.3)
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / reps
    rows[batch] = {"seconds_per_call": per_call, "seconds_per_image": per_call / batch}
    print(f"batch {batch}: {per_call * 1000:.1f} ms per 2-step call, {per_call / batch * 1000:.2f} ms per image")
json.dump({"card": torch.cuda.get_device_name(0), "params": net.num_parameters(), "rows": rows,
           "note": "denoiser only (no VAE decode), random weights, bf16 autocast"},
          open(os.path.join(os.environ.get("OUT", "."), "xxl_sampling.json"), "w"), indent=2)
EOF

stamp "MNIST pipeline, larger net (model_channels=64) and budget on the GPU"
RUNS=$OUT/runs
rm -rf "$RUNS"
common=(--data mnist --batch 256 progress=false tensorboard=false net.model_channels=64 sample_count=64)
$PY -m scm train --preset tiny-28-diffusion --out "$RUNS/teacher" --kimg 100000 "${common[@]}" \
    max_minutes=4 optim.lr=5e-3 optim.lr_decay_kimg=200 optim.lr_rampup_kimg=10 2>&1 | tail -2
$PY -m scm train --preset tiny-28-scd --out "$RUNS/scd" --teacher "$RUNS/teacher" --kimg 100000 "${common[@]}" \
    max_minutes=1.5 2>&1 | tail -1
$PY -m scm train --preset tiny-28-sct --out "$RUNS/sct" --init "$RUNS/teacher" --kimg 100000 "${common[@]}" \
    max_minutes=1.5 2>&1 | tail -1
$PY -m scm eval --ckpt "$RUNS/teacher" --ref mnist --nfe 35 --nfe 3 --n 2000 --out "$OUT/eval-teacher" | tail -4
$PY -m scm eval --ckpt "$RUNS/scd" --ref mnist --steps 1 --steps 2 --n 2000 --out "$OUT/eval-scd" | tail -4
$PY -m scm eval --ckpt "$RUNS/sct" --ref mnist --steps 1 --steps 2 --n 2000 --out "$OUT/eval-sct" | tail -4
for r in teacher scd sct; do cp "$RUNS/$r/metrics.jsonl" "$OUT/metrics-$r.jsonl"; done
rm -rf "$RUNS"   # the checkpoints stay behind; only results come back
stamp "done"
