#!/usr/bin/env bash
# The main job: train rmt_tiny from scratch on Fashion-MNIST on the CPU (9 to 12 minutes on 2
# cores), evaluate it on the 10,000 test images and print the test top-1. Sets up .venv and
# installs Debian's dataset-fashion-mnist package when they are missing. Extra arguments go to
# `rmt train` (e.g. --epochs 1); FASHION_MNIST_DIR=DIR uses idx files from another folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"

DATA="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
PKG=dataset-fashion-mnist
if [ ! -f "$DATA/t10k-labels-idx1-ubyte.gz" ] && [ ! -f "$DATA/t10k-labels-idx1-ubyte" ]; then
  if [ -n "${FASHION_MNIST_DIR:-}" ]; then
    echo "error: FASHION_MNIST_DIR=$DATA does not hold the Fashion-MNIST idx files" >&2; exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: Fashion-MNIST is not installed and this system has no apt-get; put the four idx files" \
         "(train/t10k images and labels, .gz or not) in a folder and run FASHION_MNIST_DIR=DIR $0" >&2; exit 1
  fi
  if [ "$(id -u)" -eq 0 ]; then SUDO=""
  elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; echo "[demo] installing $PKG needs root: asking sudo"
  else
    echo "error: Fashion-MNIST is missing and installing Debian's $PKG needs root; run" \
         "'apt-get install $PKG' as root, or FASHION_MNIST_DIR=DIR $0 with the idx files" >&2; exit 1
  fi
  echo "[demo] installing Fashion-MNIST: apt-get install $PKG"
  if ! $SUDO apt-get install -y -q "$PKG" >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q "$PKG" >/dev/null
  fi
fi

# OpenMP threads spin only briefly before they sleep while waiting: on a CPU shared with other
# work, long spinning slows training down by an order of magnitude (GNU OpenMP, as torch ships)
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-10000}"

NAME="fashion-mnist-demo-$(date +%Y%m%d-%H%M%S)"
RUN="runs/$NAME"
start=$(date +%s)
rmt train --config configs/fashion_mnist_cpu_demo.yaml --data "$DATA" --name "$NAME" "$@"
echo
rmt eval "$RUN/last.pth" --data "$DATA" --split test
elapsed=$(( $(date +%s) - start ))
python - "$RUN" "$elapsed" <<'PY'
import json, sys
run, elapsed = sys.argv[1], int(sys.argv[2])
result = json.load(open(f"{run}/eval_last_test.json"))
print(f"\nFashion-MNIST test top-1: {result['top1']:.2f}% on {result['images']} images "
      f"(rmt_tiny from scratch, trained and evaluated in {elapsed // 60} min {elapsed % 60} s)")
print(f"plots: {run}/curves.png, {result['confusion_png']}; checkpoints: {run}/last.pth, {run}/best.pth")
print(f"try: rmt predict {run}/last.pth IMAGE.png")
PY
