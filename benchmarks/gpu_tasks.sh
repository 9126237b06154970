#!/usr/bin/env bash
# One machine with 2 GPUs: GPU 0 runs the full Fashion-MNIST schedule (configs/fashion_mnist_gpu.yaml)
# and its test evaluation; GPU 1 runs the detection and segmentation benchmarks and the CUDA
# kernel tests. Needs the Fashion-MNIST idx files in $FASHION_MNIST_DIR. Results go to $OUT.
set -uo pipefail
OUT="${OUT:-benchmark-output}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FM="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
RUNS="${RUNS:-/tmp/rmt-runs}"
python3 -c "import torch; print(torch.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
(
  export CUDA_VISIBLE_DEVICES=0
  python3 -m rmt train --config configs/fashion_mnist_gpu.yaml --data "$FM" --output "$RUNS" --name fm-gpu
  python3 -m rmt eval "$RUNS/fm-gpu/last.pth" --data "$FM" --split test
  cp "$RUNS/fm-gpu/summary.json" "$OUT/fm_summary.json"; cp "$RUNS/fm-gpu/curves.png" "$OUT/fm_curves.png"
) > "$OUT/fm_train.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  python3 benchmarks/detection.py --json "$OUT/detection.json"
  python3 benchmarks/segmentation.py --json "$OUT/segmentation.json"
  python3 -m pytest -q -p no:cacheprovider tests/test_masa_ops.py tests/test_dwconv.py 2>&1 | tail -4
) > "$OUT/dense_and_kernels.log" 2>&1 &
wait
tr '\r' '\n' < "$OUT/fm_train.log" | grep -v "^epoch .*step/s" | tail -25
cat "$OUT/dense_and_kernels.log"
