#!/usr/bin/env bash
# One GPU run: whole-model numerics of the fast path against the reference (fp32 values and
# gradients, bf16 values), the tile sweep of the depthwise-conv, LayerNorm and MaSA forward kernels, the eager
# throughput table and a profile of RMT-S.
# Results go to $OUT (or ./benchmark-output). Usage: bash tools/gpu_kernels_and_throughput.sh [--with-tests]
set -uo pipefail
OUT="${OUT:-benchmark-output}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
if [ "${1:-}" = "--with-tests" ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_masa_ops.py tests/test_dwconv.py tests/test_layernorm.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -5
fi
timeout 300 python3 tools/kernel_tiles.py --json "$OUT/kernel_tiles.json" 2>&1 | tee "$OUT/kernel_tiles.log"
python3 -m rmt benchmark --check --sizes 1024:16 --compiled '' --profile rmt_small \
  --json "$OUT/throughput_eager.json" 2>&1 | tee "$OUT/throughput_eager.log"
