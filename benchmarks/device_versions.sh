#!/usr/bin/env bash
# The test suite and a dry run of the GPU script on this CPU, under the lent GPU machine's versions (torch 2.11.0 with
# its triton 3.6.0, transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors
# 0.8.0: ../.library/device/KINDS.md; diffusers, starlette and uvicorn travel at this checkout's versions, see
# gpu_wheels.sh), so that a version break is found here and not in a lent session's 15 minutes. Its Python is this
# machine's (3.11; the GPU machine's is 3.12). Writes benchmarks/results/device-versions.md.
#
#   bash benchmarks/device_versions.sh   (about 15 minutes on 2 cores, 2–3 more to make the environment; alone)
#
# PyPI's torch 2.11.0 is a CUDA build; it runs on the CPU but pulls the CUDA libraries: the environment takes about
# 4.7 GB, in $VENV (default /tmp/scm-torch-2.11.0), made once and reused. numpy stays below 2.4: triton 3.6's
# interpreter (the kernel tests' CPU path) converts one-element arrays to scalars, which numpy 2.4 refuses; on the
# GPU the kernels are compiled, not interpreted, so the machine's own numpy does not matter there.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
VENV=${VENV:-/tmp/scm-torch-$TORCH}
PINS=("torch==$TORCH" "numpy<2.4" transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 tokenizers==0.23.2
      safetensors==0.8.0)
RESULT=benchmarks/results/device-versions.md
LOGS=$(mktemp -d)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" &&
        "$VENV/bin/pip" install -q "${PINS[@]}" 2> >(grep -v "is ignored" >&2) &&
        "$VENV/bin/pip" install -q -e ".[dev]" "${PINS[@]}" 2> >(grep -v "is ignored" >&2) || exit 1
fi
versions=$("$VENV/bin/python" -c "import sys, importlib.metadata as m
names = 'torch triton numpy transformers accelerate huggingface_hub tokenizers safetensors diffusers peft'.split()
print(f'python {sys.version.split()[0]},', ', '.join(f'{n} {m.version(n)}' for n in names))")
start=$(date +%s)
"$VENV/bin/python" -m pytest -p no:randomly -rfEs --ignore=tests/test_serve_browser.py >"$LOGS/pytest.txt" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))
start=$(date +%s)
OUT=$LOGS/dry DEV=cpu PY="$VENV/bin/python" bash benchmarks/gpu_owed.sh >"$LOGS/dry.txt" 2>&1
dry_rc=$?
dry_s=$(( $(date +%s) - start ))
{
    echo "# The test suite and the GPU script's dry run under the GPU machine's versions, on this CPU"
    echo
    echo "Command: \`bash benchmarks/device_versions.sh\`  "
    echo "Date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nproc) CPU cores; $versions"
    echo
    echo "## make test's pytest (without the browser test), exit status $tests_rc, $tests_s s"
    echo
    echo '```'
    grep -E "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)" "$LOGS/pytest.txt"
    echo '```'
    echo
    echo "## benchmarks/gpu_owed.sh on the CPU (toy sizes, every section), exit status $dry_rc, $dry_s s"
    echo
    echo '```'
    grep -E "^\[gpu_owed\] [0-9]+ s: (ok|FAILED)" "$LOGS/dry.txt"
    echo '```'
} >"$RESULT"
cat "$RESULT"
echo "logs: $LOGS"
[ "$tests_rc" = 0 ] && [ "$dry_rc" = 0 ]
