#!/usr/bin/env bash
# One GPU: checks `rmt train --cuda-graph` against eager training (the CUDA test), then times the
# Fashion-MNIST GPU recipe for 3 epochs with and without it. Needs the idx files in $FASHION_MNIST_DIR.
set -uo pipefail
OUT="${OUT:-benchmark-output}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FM="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
RUNS="${RUNS:-/tmp/rmt-runs}"
python3 -m pytest -q -x -p no:cacheprovider tests/test_train_run.py -k cuda_graph 2>&1 | tail -3
for mode in --no-cuda-graph --cuda-graph; do
  python3 -m rmt train --config configs/fashion_mnist_gpu.yaml --data "$FM" --output "$RUNS" \
    --name "fm$mode" --time-budget 0 --epochs 3 $mode 2>&1 | tr '\r' '\n' | grep -E "^done|error|Error" 
done
