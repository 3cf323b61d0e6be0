#!/usr/bin/env bash
# The scale benchmark (benchmarks/scale.py) on a CUDA GPU, as one command (issue 14, item 5).
#
#   bash scripts/scale_gpu.sh                       # every config: hidden 4096, seq 256 (batch 2) and 1024 (batch 4)
#   bash scripts/scale_gpu.sh --configs h4096-qv-s256-b2,h4096-all-s256-b2   # a subset (any scale.py option)
#
# Run from the repository root on the GPU machine. Needs python3 with a CUDA torch, transformers, peft,
# jaxtyping, einops and tqdm, plus bayesian-lora 0.0.6 and laplace-torch 0.3 (with curvlinops-for-pytorch,
# backpack-for-pytorch, asdfghjkl, einconv, unfoldNd). On a machine without a package index, put their wheels
# in .whl/ first (e.g. `pip download --no-deps -d .whl bayesian-lora==0.0.6 laplace-torch==0.3
# curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 asdfghjkl==0.1a4 einconv==0.1.0 unfoldNd==0.2.3`);
# they are installed into /tmp/site. Writes $OUT/scale_cuda.json and its log ($OUT defaults to
# benchmarks/results); back on the main checkout, `python benchmarks/scale.py --merge FILE` adds the GPU
# records to benchmarks/results/scale.json beside the CPU ones (each record names its device and GPU) and
# rewrites the Scale section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
set -o pipefail
python3 benchmarks/scale.py --device cuda --threads 8 --output "$out/scale_cuda.json" "$@" 2>&1 | tee "$out/scale_cuda.log"
