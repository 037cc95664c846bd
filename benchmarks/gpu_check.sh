#!/usr/bin/env bash
# GPU check for the triton strategy (and the SDPA strategies), meant to finish within 10 minutes on
# one H100/H200. Run from the repository root. It needs torch with CUDA and triton (the device
# image has both); transformers is optional (the hf_diffllama row). Results land in ${OUT:-gpu-results}.
set -euo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"
# 1. Correctness at real shapes (bf16, N = 1k-8k, d = 64 and 128) and kernel timings vs flash SDPA.
timeout 240 python3 benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
# 2. Every strategy, standard SDPA and DiffLlama through the benchmark, op level, causal, bf16.
timeout 300 python3 -m multihead_sdpadiff.cli bench --device cuda --dtype bfloat16 \
    --seq-lens 1024 2048 4096 8192 --modes fwd fwd_bwd --level op --out "$out/bench" 2>&1 | tee "$out/bench.txt"
