"""Multi-GPU training check: throughput, rank agreement and the loss curve of a short run.

Run it once on one GPU and once under torchrun on several, with the same options:

    python benchmarks/multi_gpu.py --tag 1gpu --batch-size 128
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py --tag 2gpu --batch-size 128
    python benchmarks/compare_runs.py OUT/1gpu.json OUT/2gpu.json

Each run trains with `rmt.classification` (DDP over NCCL, or FSDP2 with --fsdp) on Fashion-MNIST
upscaled to --input-size, then reports: training img/s over all ranks (median of the logging
windows after the first, so kernel compilation is excluded), the largest difference of any
parameter between ranks after the last step (all-gathered), and the per-step training loss.
Rank 0 writes OUT/TAG.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rmt  # noqa: E402
from rmt.classification import config  # noqa: E402
from rmt.classification.train import Trainer, make_run_dir  # noqa: E402
from rmt.engine import cleanup_distributed, rank_param_disagreement, setup_distributed  # noqa: E402
from rmt.engine.metrics_log import read_jsonl  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True)
    p.add_argument("--data", default=os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--batch-size", type=int, default=128, help="per GPU")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--dwconv-cudnn", action="store_true",
                   help="train the depthwise convs through cuDNN instead of the fused Triton kernels")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step from a CUDA graph (rmt train --cuda-graph)")
    p.add_argument("--block-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each block's training kernels from CUDA graphs (rmt train --block-graphs; "
                        "default: rmt train's, on where it applies)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmark-output"))
    args = p.parse_args()

    if args.dwconv_cudnn:
        rmt.set_fast_path(dwconv_training_kernels=False)
    info = setup_distributed(args.device)
    options = dict(dataset="fashion-mnist", data=args.data, model=args.model, input_size=args.input_size,
                   pipeline="tensor", aa="none", mixup=0.0, cutmix=0.0, reprob=0.0, aug_repeats=0,
                   smoothing=0.1, batch_size=args.batch_size, epochs=1, max_steps=args.steps,
                   warmup_epochs=0.0, lr=1e-3, amp="bf16" if args.device == "cuda" else "none", model_ema=False, fsdp=args.fsdp,
                   cuda_graph=args.cuda_graph, block_graphs=args.block_graphs,
                   output=str(Path(args.out) / "runs"), name=args.tag, seed=args.seed,
                   log_interval=10, checkpoint_every=0, device=args.device, val_subset=512)
    cfg = config.resolve(options)
    trainer = Trainer(cfg, info, make_run_dir(cfg, info, None))
    trainer.fit()
    gap = rank_param_disagreement(trainer.model)
    if info.is_main:
        records = read_jsonl(Path(trainer.run_dir) / "log.jsonl")
        windows = [r["img_per_s"] for r in records if r.get("event") == "train" and r.get("img_per_s")]
        losses = [(r["step"], r["train_loss"]) for r in records if r.get("event") == "train"]
        result = dict(tag=args.tag, world_size=info.world_size, model=args.model, fsdp=args.fsdp,
                      cuda_graph=args.cuda_graph, block_graphs=args.block_graphs, batch_per_gpu=args.batch_size, global_batch=args.batch_size * info.world_size,
                      steps=args.steps, img_per_s=statistics.median(windows[1:] or windows) if windows else None,
                      rank_max_abs_diff=gap, losses=losses,
                      device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      torch=torch.__version__)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.tag}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
