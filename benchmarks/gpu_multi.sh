#!/usr/bin/env bash
# Two GPUs: DDP scaling (1 vs 2 GPUs, batch 128 per GPU), rank agreement, the loss curve at equal
# global batch (1 GPU x 128 vs 2 GPUs x 64), and FSDP2 with rmt_large: train, checkpoint, resume.
# MODES="eager blocks graph" measures the scaling of eager steps, of eager steps whose blocks replay
# CUDA graphs (rmt train's default on CUDA) and of whole steps replayed from CUDA graphs.
set -uo pipefail
OUT="${OUT:-benchmark-output}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
RUNS="${RUNS:-/tmp/rmt-runs}"
STEPS="${STEPS:-60}"
FSDP="${FSDP:-1}"   # 0 skips the FSDP2 part
CURVE="${CURVE:-1}"  # 0 skips the equal-global-batch loss-curve run
MODES="${MODES:-eager}"
{
for mode in $MODES; do
  case "$mode" in graph) flag="--cuda-graph";; blocks) flag="--block-graphs";; *) flag="--no-block-graphs";; esac
  echo "== $mode steps: 1 GPU, then 2 GPUs (batch 128 per GPU)"
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/multi_gpu.py --tag "1gpu_b128_$mode" --batch-size 128 --steps "$STEPS" $flag
  torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py --tag "2gpu_b128_$mode" --batch-size 128 \
    --steps "$STEPS" $flag
  python3 benchmarks/compare_runs.py "$OUT/1gpu_b128_$mode.json" "$OUT/2gpu_b128_$mode.json"
done
if [ "$CURVE" = 1 ]; then
  torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py --tag 2gpu_b64 --batch-size 64 --steps "$STEPS"
  python3 benchmarks/compare_runs.py "$OUT/1gpu_b128_eager.json" "$OUT/2gpu_b64.json"
fi
if [ "$FSDP" = 1 ]; then
echo "== FSDP2 rmt_large: 10 steps with a checkpoint every 5, then resume to 15"
FS="--dataset fashion-mnist --data $FASHION_MNIST_DIR --model rmt_large --fsdp --input-size 224 --pipeline tensor --aa none --mixup 0 --cutmix 0 --aug-repeats 0 --batch-size 64 --amp bf16 --no-model-ema --val-subset 256 --log-interval 5 --output $RUNS"
torchrun --standalone --nproc_per_node 2 -m rmt train $FS --name fsdp-large --max-steps 10 --checkpoint-every 5
torchrun --standalone --nproc_per_node 2 -m rmt train $FS --resume "$RUNS/fsdp-large" --max-steps 15
python3 - "$RUNS/fsdp-large/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("fsdp log:", [(r.get("event"), r.get("step"), round(r["train_loss"], 4) if "train_loss" in r else None) for r in rows if r.get("event") in ("train", "resume", "epoch")])
PY
fi
} 2>&1 | tr '\r' '\n' | grep -v "step/s" | tee "$OUT/multi_gpu.log"
