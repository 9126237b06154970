"""Train an RMT classifier. The defaults are the paper's ImageNet-1k recipe (AdamW, lr 1e-3 per
1024 images, weight decay 0.05, cosine with 5 warm-up epochs, RandAugment rand-m9-mstd0.5-inc1,
Mixup 0.8 / CutMix 1.0, random erasing 0.25, label smoothing 0.1, repeated augmentation, drop
path per variant, EMA 0.99996, 300 epochs). Every option is a flag and a key of a YAML file given
with --config; explicit flags win over the file. The run directory (runs/NAME) receives
config.yaml, log.jsonl, curves.png, last.pth, best.pth and summary.json.

Start one process per GPU with torchrun for DDP (NCCL on CUDA, gloo on CPU), on one machine or
several (torchrun's own rendezvous); --fsdp shards the model instead.

examples:
  rmt train --config configs/fashion_mnist_cpu_demo.yaml              # the CPU demo
  rmt train --config configs/fashion_mnist_gpu.yaml                   # one GPU, >= 95% top-1
  rmt train --dataset folder --data /data/imagenet --model rmt_small  # ImageNet recipe
  torchrun --nproc_per_node 8 -m rmt train --data /data/imagenet --model rmt_base --batch-size 128
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m rmt train --data /data/imagenet --model rmt_large --fsdp
  rmt train --resume runs/rmt_tiny-fashion-mnist-20250101-120000     # continue exactly
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..classification.config import add_arguments as add_options
    add_options(p)


def run(args: argparse.Namespace) -> int:
    from ..classification.train import train
    options = {k: v for k, v in vars(args).items() if k not in ("_module", "command", "debug")}
    summary = train(options)
    final = summary.get("final") or {}
    if summary.get("rank", 0) == 0 and ("val_top1" in final or "ema_top1" in final):
        parts = [f"{name} top-1 {final[key]:.2f}%" for name, key in (("model", "val_top1"), ("EMA", "ema_top1"))
                 if key in final]
        speed = summary.get("train_img_per_s")
        print(f"done: {', '.join(parts)} on {final.get('val_images')} validation images; "
              f"best {summary['best_top1']:.2f}%; {speed:.0f} training img/s; run in {summary['run_dir']}")
    elif summary.get("rank", 0) == 0:
        print(f"stopped after {summary['steps']} steps; state saved in {summary['run_dir']}/last.pth")
    return 0
