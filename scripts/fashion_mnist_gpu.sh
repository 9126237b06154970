#!/usr/bin/env bash
# Full Fashion-MNIST schedule on one GPU (configs/fashion_mnist_gpu.yaml, about 9 minutes on an H200):
# trains rmt_tiny from scratch, evaluates the EMA weights on the 10,000 test images, prints
# a table and writes runs/NAME/benchmark.json. Extra arguments go to `rmt train`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
DATA="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
NAME="fashion-mnist-gpu-$(date +%Y%m%d-%H%M%S)"
RUN="runs/$NAME"
start=$(date +%s)
rmt train --config configs/fashion_mnist_gpu.yaml --data "$DATA" --name "$NAME" "$@"
rmt eval "$RUN/last.pth" --data "$DATA" --split test
elapsed=$(( $(date +%s) - start ))
python - "$RUN" "$elapsed" <<'PY'
import json, sys, torch
run, elapsed = sys.argv[1], int(sys.argv[2])
summary = json.load(open(f"{run}/summary.json"))
ev = json.load(open(f"{run}/eval_last_test.json"))
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
rows = [("device", device), ("epochs", summary["epochs_done"]), ("steps", summary["steps"]),
        ("train img/s (mean over epochs)", f"{summary['train_img_per_s']:.0f}"),
        ("test top-1 (%, EMA)", f"{ev['top1']:.2f}"), ("test top-5 (%)", f"{ev['top5']:.2f}"),
        ("best epoch top-1 (%)", f"{summary['best_top1']:.2f}"), ("wall time (s, train + eval)", elapsed)]
width = max(len(k) for k, _ in rows)
print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
out = dict(device=device, epochs=summary["epochs_done"], steps=summary["steps"],
           train_img_per_s=summary["train_img_per_s"], test_top1=ev["top1"], test_top5=ev["top5"],
           best_top1=summary["best_top1"], wall_s=elapsed, run_dir=run)
json.dump(out, open(f"{run}/benchmark.json", "w"), indent=2)
print(f"written: {run}/benchmark.json")
PY
