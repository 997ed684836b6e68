#!/usr/bin/env bash
# GPU check (about 10 minutes; installs nothing from the network). Run on a lent GPU machine from the repo
# root, with MNIST carried along (the machine cannot download it):
#
#   here:   mkdir -p .gpu-data/mnist && cp ~/.cache/scm/mnist/mnist.npz .gpu-data/mnist/   (.gpu-data is git-ignored)
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-data"], timeout_s=600)
#
# It writes two files to $OUT (the device tool returns at most 8): log.txt and gpu_check.tgz with the card, a numerical JVP check on the GPU,
# the tangent-pass and training-step costs, the MNIST pipeline with a larger net and budget (teacher → sCD and
# sCT → FD-MNIST), the attention kernels (correctness and speed against the math path), the transformer's costs,
# and 2-step sampling time of the XXL U-Net on 64×64×4 latents and DiT-XL/2 on 32×32×4 (random weights, bf16,
# batch 1 and 64; the paper's blog quotes 0.11 s per image for its 1.5B model on an A100).
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

stamp "attention kernels on the GPU (Triton: fused O + tangent, LSE tangent, backward vs float64 math; fp32, bf16)"
$PY - <<'EOF' 2>&1 | tee "$OUT/attention_triton_check.txt" || stamp "FAILED: attention kernel check (attention_triton_check.txt)"
import torch, triton
import torch.autograd.forward_ad as fwAD
import scm.nets.attention as A
from scm.nets.attention import attention, attention_jvp
dev = torch.device("cuda")
print("triton", triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))
rel = lambda p, q: float((p.detach().double() - q.detach().double()).norm() / q.detach().double().norm())
g = torch.Generator(dev).manual_seed(0)
# bounds: fp32 ("ieee" products) ≈ 1e-6 measured in the interpreter; bf16 ≈ 1.6 u (u = 2⁻⁸), bounded by 5 u
bounds = {torch.float32: 2e-5, torch.bfloat16: 5 * 2.0**-8}
worst = {}
for dtype, bound in bounds.items():
    for b, h, n, nk, d, dv in [(2, 4, 1000, 1000, 64, 64), (2, 3, 333, 517, 72, 72), (1, 4, 257, 200, 128, 128),
                               (2, 2, 300, 300, 32, 48)]:
        shapes = [(b, h, n, d), (b, h, nk, d), (b, h, nk, dv)] * 2
        xs = [torch.randn(s, generator=g, device=dev).to(dtype) for s in shapes]
        ref = [x.double() for x in xs]   # float64 math on the same rounded inputs
        o_r, t_r, l_r = attention_jvp(*ref, backend="math", return_lse=True)
        o, t, l = attention_jvp(*xs, backend="triton", return_lse=True)
        errs = {"O": rel(o, o_r), "tO fused": rel(t, t_r), "lse": float((l.double() - l_r).abs().max())}
        # the layer ([N, L, C], batch·heads folded): kernels on CUDA; JVP (LSE tangent) and exact backward
        fold = lambda a: a.reshape(b * h, *a.shape[2:])
        q, k, v, tq, tk, tv = map(fold, xs)
        assert A._on_kernels(q, k, v)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with fwAD.dual_level():
            dual = attention(*(fwAD.make_dual(x, tx) for x, tx in zip(leaves, (tq, tk, tv))))
            out, t_layer = fwAD.unpack_dual(dual)
            gout = torch.randn(out.shape, generator=g, device=dev).to(dtype)
            grads = torch.autograd.grad(out, leaves, gout)
        _, t_func = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
        lref = [fold(x).clone().requires_grad_() for x in ref[:3]]
        grads_r = torch.autograd.grad(A._Attention.apply(*lref, d ** -0.5)[0], lref, gout.double())
        errs |= {"layer O": rel(out, fold(o_r)), "layer tO": rel(t_layer, fold(t_r)), "func tO": rel(t_func, fold(t_r))}
        errs |= {f"d{name}": rel(gr, gr_r) for name, gr, gr_r in zip("qkv", grads, grads_r)}
        print(f"{str(dtype):15} B={b} H={h} N={n} Nk={nk} d={d} dv={dv}: " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
        worst[dtype] = max(worst.get(dtype, 0.0), *(e for k, e in errs.items() if k != "lse"))
        assert errs["lse"] < 1e-4, errs
print({str(k): f"{v:.1e}" for k, v in worst.items()})
assert all(worst[dt] < bounds[dt] for dt in bounds), worst
print("attention kernels: OK")
EOF

stamp "attention tangent cost: fused Triton kernel vs math path (bf16, N = 256 … 4096, d = 64 and 128)"
{ $PY benchmarks/attention_jvp.py --device cuda --repeats 10 | tail -30 && cp benchmarks/results/attention_jvp.* "$OUT/"; } \
    || stamp "FAILED: benchmarks/attention_jvp.py"

stamp "tangent-pass and step costs"
$PY benchmarks/jvp_cost.py --device cuda --batch 64 --res 32 --channels 3 --name jvp_cost-cuda --repeats 20 | tail -8
$PY benchmarks/step_cost.py --device cuda --batch 64 --res 32 --channels 3 | tail -9
cp benchmarks/results/jvp_cost-cuda.* benchmarks/results/step_cost-cuda.* "$OUT/"
stamp "tangent-pass and step costs of the transformer (dit-tiny, 32×32×3)"
{ $PY benchmarks/jvp_cost.py --device cuda --preset dit-tiny --batch 64 --res 32 --channels 3 \
      --name jvp_cost-dit-tiny-cuda --repeats 20 | tail -8 &&
  $PY benchmarks/step_cost.py --device cuda --net dit-tiny --batch 64 --res 32 --channels 3 | tail -9 &&
  cp benchmarks/results/jvp_cost-dit-tiny-cuda.* benchmarks/results/step_cost-dit-tiny-cuda.* "$OUT/"; } \
    || stamp "FAILED: dit-tiny costs"

stamp "2-step sampling time, random weights, bf16: XXL U-Net on 64×64×4 latents, DiT-XL/2 on 32×32×4 latents"
$PY - <<'EOF' 2>&1 | tee "$OUT/sampling_speed.txt"
import json, os, time, torch
from scm.nets import build_dit, build_unet
from scm.sampling import consistency_sample, consistency_times
dev = torch.device("cuda")
nets = {"XXL U-Net (64×64×4)": (lambda: build_unet("XXL", 64, 4, label_dim=1000, guidance_embed=True), (4, 64, 64)),
        "DiT-XL/2 (32×32×4)": (lambda: build_dit("DiT-XL/2", 32, 4, label_dim=1000, guidance_embed=True), (4, 32, 32))}
ts = consistency_times(2)
results = {"card": torch.cuda.get_device_name(0), "note": "denoiser only (no VAE decode), random weights, bf16 autocast",
           "nets": {}}
for name, (build, shape) in nets.items():
    with torch.device(dev):
        net = build().eval()
    rows = {}
    for batch in (1, 64):
        noise = 0.5 * torch.randn(batch, *shape, device=dev)
        labels = torch.randint(0, 1000, (batch,), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            for _ in range(3):
                consistency_sample(net, noise, ts, 0.5, labels=labels, guidance=1.3)
            torch.cuda.synchronize(); t0 = time.perf_counter(); reps = 10
            for _ in range(reps):
                consistency_sample(net, noise, ts, 0.5, labels=labels, guidance=1.3)
            torch.cuda.synchronize()
        per_call = (time.perf_counter() - t0) / reps
        rows[batch] = {"seconds_per_call": per_call, "seconds_per_image": per_call / batch}
        print(f"{name}: {net.num_parameters() / 1e6:.1f} M parameters, batch {batch}: {per_call * 1000:.1f} ms per "
              f"2-step call, {per_call / batch * 1000:.2f} ms per image")
    results["nets"][name] = {"params": net.num_parameters(), "rows": rows}
    del net; torch.cuda.empty_cache()
json.dump(results, open(os.path.join(os.environ.get("OUT", "."), "sampling_speed.json"), "w"), indent=2)
EOF

stamp "MNIST pipeline, larger net (model_channels=64) and budget on the GPU"
RUNS=$OUT/runs
rm -rf "$RUNS"
common=(--data mnist --batch 256 progress=false tensorboard=false net.model_channels=64 sample_count=64)
$PY -m scm train --preset tiny-28-diffusion --out "$RUNS/teacher" --kimg 100000 "${common[@]}" \
    max_minutes=2.5 optim.lr=5e-3 optim.lr_decay_kimg=200 optim.lr_rampup_kimg=10 2>&1 | tail -2
$PY -m scm train --preset tiny-28-scd --out "$RUNS/scd" --teacher "$RUNS/teacher" --kimg 100000 "${common[@]}" \
    max_minutes=1 2>&1 | tail -1
$PY -m scm train --preset tiny-28-sct --out "$RUNS/sct" --init "$RUNS/teacher" --kimg 100000 "${common[@]}" \
    max_minutes=1 2>&1 | tail -1
$PY -m scm eval --ckpt "$RUNS/teacher" --ref mnist --nfe 35 --nfe 3 --n 2000 --out "$OUT/eval-teacher" | tail -4
$PY -m scm eval --ckpt "$RUNS/scd" --ref mnist --steps 1 --steps 2 --n 2000 --out "$OUT/eval-scd" | tail -4
$PY -m scm eval --ckpt "$RUNS/sct" --ref mnist --steps 1 --steps 2 --n 2000 --out "$OUT/eval-sct" | tail -4
for r in teacher scd sct; do cp "$RUNS/$r/metrics.jsonl" "$OUT/metrics-$r.jsonl"; done
rm -rf "$RUNS"   # the checkpoints stay behind; only results come back
stamp "done"
