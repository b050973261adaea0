#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one go (a few minutes on an H100/H200-class GPU). Run from the repo root
# with the project installed; MAE_DIR: a checkout of facebookresearch/mae (the official column is skipped without).
#   MAE_DIR=~/src/mae bash benchmarks/gpu.sh
set -euo pipefail
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
official=()
[[ -n "${MAE_DIR:-}" ]] && official=(--official "$MAE_DIR")
# 1. The model step, ViT-B/16 224 batch 256 bf16: mpp vs official vs Hugging Face, same weights and masks.
python benchmarks/bench_pretrain_step.py "${official[@]}" --cases vit_base_224px_b256 --repeats 10 \
    --out benchmarks/results/gpu_pretrain_step.json
# 2. The whole trainer on a synthetic JPEG folder against the bare step at the same batch.
python benchmarks/bench_trainer.py --jpeg-images 12800 --batch 256 --workers "$(( $(nproc) - 2 ))" --epochs 2 \
    --rounds 1 --out benchmarks/results/gpu_trainer.json
# 3. Decoding: per CPU core, and batched nvJPEG on the GPU.
python benchmarks/bench_jpeg_decode.py --images 500 --out benchmarks/results/gpu_jpeg_decode.json
