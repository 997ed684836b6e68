#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels in .whl/ (git-ignored), for benchmarks/gpu_owed.sh to carry
# (run(..., carry=[".whl"])): diffusers (with importlib_metadata, its one need the machine lacks) for the
# text-to-image sections, jvp-flash-attention (the peer kernel of attention_peer.py), and starlette and uvicorn for
# `scm serve`; diffusers, starlette and uvicorn at this checkout's versions. The machine already has torch 2.11,
# triton 3.6, peft, transformers 5.17, huggingface_hub 1.33 and safetensors 0.8 (../.library/device/KINDS.md),
# which these versions accept. Pure-Python wheels, about 7 MB together.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    "diffusers==$(version diffusers)" importlib_metadata==8.7.0 jvp-flash-attention==0.14.0 \
    "starlette==$(version starlette)" "uvicorn==$(version uvicorn)" 2> >(grep -v "is ignored" >&2)
ls -l .whl
