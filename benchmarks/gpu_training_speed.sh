#!/usr/bin/env bash
# One machine with 2 GPUs, both busy for about FM_MINUTES + 1 minutes:
#   GPU 1: the Fashion-MNIST schedule of configs/fashion_mnist_gpu.yaml (fitted to FM_MINUTES) and
#          its test evaluation;
#   GPU 0: training-step execution modes (eager, eager with cuDNN depthwise convs, CUDA graph) and a
#          GPU/CPU profile,
#          then the RMT-S rows of the throughput table with numerics checks and compiled inference.
# Needs the Fashion-MNIST idx files in $FASHION_MNIST_DIR. Results go to $OUT.
set -uo pipefail
OUT="${OUT:-benchmark-output}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FM="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
RUNS="${RUNS:-/tmp/rmt-runs}"
FM_MINUTES="${FM_MINUTES:-7}"
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
(
  export CUDA_VISIBLE_DEVICES=1
  timeout $(( FM_MINUTES * 60 + 45 )) python3 -m rmt train --config configs/fashion_mnist_gpu.yaml --data "$FM" \
    --output "$RUNS" --name fm-gpu --time-budget "$FM_MINUTES"
  python3 -m rmt eval "$RUNS/fm-gpu/last.pth" --data "$FM" --split test
  cp "$RUNS/fm-gpu/summary.json" "$OUT/fm_summary.json"; cp "$RUNS/fm-gpu/curves.png" "$OUT/fm_curves.png"
  cp "$RUNS/fm-gpu/log.jsonl" "$OUT/fm_log.jsonl"
) > "$OUT/fm_train.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 benchmarks/training_step.py --models rmt_small,swin_tiny_patch4_window7_224 \
    --modes "${TRAIN_MODES:-eager,eager-cudnn,graphed}" --batch 128 --profile rmt_small --json "$OUT/train_modes.json"
  timeout 220 python3 -m rmt benchmark --models rmt_small --check --sizes 1024:16 \
    --peers swin_tiny_patch4_window7_224,convnext_tiny --compiled rmt_small --json "$OUT/throughput_s.json"
) > "$OUT/gpu0.log" 2>&1 &
wait
cat "$OUT/gpu0.log"
tr '\r' '\n' < "$OUT/fm_train.log" | grep -v "step/s\|it/s\]" | tail -30
