#!/usr/bin/env bash
# torch.compile rows of the throughput table (inference, 224, batch 256) for RMT-S and its peers.
set -uo pipefail
OUT="${OUT:-benchmark-output}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m rmt benchmark --models rmt_small --impls fast --modes infer --sizes '' \
  --peers '' --compiled rmt_small,swin_tiny_patch4_window7_224,convnext_tiny \
  --json "$OUT/throughput_compiled.json" 2>&1 | tee "$OUT/throughput_compiled.log"
