#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, in one go (run from the repo root on a CUDA machine):
#   bash bench/run_gpu.sh OUTDIR
# Wheels in .whl/ (open_clip_torch, zarr and their small deps, for a machine without them) are
# installed into /tmp/site first when present.
set -u
OUT=${1:-/tmp/medalign-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, open_clip, zarr; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'open_clip', open_clip.__version__, 'zarr', zarr.__version__)" | tee -a "$OUT/gpu.txt"
echo "== cache build, UniMed-L-sized (ViT-L/14-336), ours vs batch-1 loop"
timeout 150 python3 bench/cache.py --device cuda --arch l --count 512 --batch-size 64 --num-workers 12 \
  --skip-store --json "$OUT/cache_gpu.json" 2>&1 | tee "$OUT/cache_gpu.log" | tail -25
[ "${CACHE_ONLY:-0}" = 1 ] && exit 0
echo "== training step, 7B-shaped student, bf16"
timeout 170 python3 bench/train_step.py --device cuda --preset 7b --steps 4 --warmup 1 2>&1 | tee "$OUT/train_gpu.log" | tail -20
[ "${GPU_TESTS:-0}" = 1 ] || exit 0
echo "== gpu tests"
timeout 100 python3 -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
