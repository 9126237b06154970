#!/usr/bin/env bash
# One machine with 2 GPUs, both busy for about FM_MINUTES + 1 minutes:
#   GPU 1: the Fashion-MNIST schedule of configs/fashion_mnist_gpu.yaml (fitted to FM_MINUTES, extra
#          `rmt train` options in FM_ARGS; if that run fails, it is run again without them) and its
#          test evaluation;
#   GPU 0: with --with-tests first the CUDA kernel tests and the CUDA-graph training test; then
#          training-step execution modes (eager and CUDA graph, with and without the Triton
#          LayerNorm and the single-tile MaSA backward) and a GPU/CPU profile,
#          then the RMT-S rows of the throughput table with numerics checks and compiled inference.
# Needs the Fashion-MNIST idx files in $FASHION_MNIST_DIR. Results go to $OUT.
set -uo pipefail
OUT="${OUT:-benchmark-output}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FM="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
RUNS="${RUNS:-/tmp/rmt-runs}"
FM_MINUTES="${FM_MINUTES:-7}"
FM_ARGS="${FM_ARGS:-}"
fm_train() {  # $1: minutes, then extra options
  local minutes="$1"; shift
  timeout "$(python3 -c "print(int($minutes * 60 + 45))")" python3 -m rmt train --config configs/fashion_mnist_gpu.yaml \
    --data "$FM" --output "$RUNS" --name fm-gpu --time-budget "$minutes" "$@"
}
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
(
  export CUDA_VISIBLE_DEVICES=1
  t0=$(date +%s)
  # shellcheck disable=SC2086
  if ! fm_train "$FM_MINUTES" $FM_ARGS && [ ! -f "$RUNS/fm-gpu/last.pth" ]; then
    left=$(python3 -c "print(max(1.0, $FM_MINUTES - ($(date +%s) - $t0) / 60 - 0.5))")
    echo "== the run with FM_ARGS='$FM_ARGS' failed; again without them and without CUDA graphs for $left minutes"
    rm -rf "$RUNS/fm-gpu"; fm_train "$left" --no-cuda-graph
  fi
  python3 -m rmt eval "$RUNS/fm-gpu/last.pth" --data "$FM" --split test
  cp "$RUNS/fm-gpu/summary.json" "$OUT/fm_summary.json"; cp "$RUNS/fm-gpu/curves.png" "$OUT/fm_curves.png"
  cp "$RUNS/fm-gpu/log.jsonl" "$OUT/fm_log.jsonl"
) > "$OUT/fm_train.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=0
  if [ "${1:-}" = "--with-tests" ]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_masa_ops.py tests/test_dwconv.py \
      tests/test_train_run.py::test_cuda_graph_training_follows_the_eager_run 2>&1 | tail -15
  fi
  timeout 180 python3 benchmarks/training_step.py --models rmt_small,swin_tiny_patch4_window7_224 \
    --modes "${TRAIN_MODES:-eager,eager-torchln-twokernel,graphed,graphed-torchln,graphed-twokernel}" --batch 128 --profile rmt_small --json "$OUT/train_modes.json"
  timeout 220 python3 -m rmt benchmark --models rmt_small --check --sizes 1024:16 \
    --peers swin_tiny_patch4_window7_224,convnext_tiny --compiled rmt_small --json "$OUT/throughput_s.json"
) > "$OUT/gpu0.log" 2>&1 &
wait
cat "$OUT/gpu0.log"
tr '\r' '\n' < "$OUT/fm_train.log" | grep -v "step/s\|it/s\]" | tail -30
