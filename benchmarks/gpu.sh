#!/usr/bin/env bash
# One short, prepared GPU check (under 5 minutes, no downloads): ViT-B-32, random init, 224 px, bf16.
# Prints training and inference images/s of MuMIC's step against a bare open_clip loop, and achieved TFLOP/s.
#
# The lent GPU machines have PyTorch but not open_clip or pydantic, and cannot reach a package index. Prepare the
# missing wheels here once (they are git-ignored) and carry them:
#   benchmarks/gpu_wheels.sh            # writes .gpu-wheels/
#   device run: carry [".gpu-wheels"], command: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import open_clip, pydantic" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --find-links .gpu-wheels open_clip_torch pydantic ftfy
fi
OUT_DIR=${OUT:-reports}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
run() {
  timeout 150 "$PY" benchmarks/train_throughput.py --model ViT-B-32 --device cuda --precision bf16 \
    --classes 120 --steps 10 --rounds 4 --warmup 3 "$@"
}
run --batch-size 256 --json "$OUT_DIR/gpu_vit_b32_bs256.json"
run --batch-size 256 --compile --json "$OUT_DIR/gpu_vit_b32_bs256_compiled.json"
