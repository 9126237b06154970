"""Token labeling on Fashion-MNIST in one command: a teacher from the GPU demo config, its label maps,
and two rmt_tiny students trained on the same schedule, without and with token labels.

    python benchmarks/token_label_demo.py --data DIR                  # one GPU, about 6 minutes on an H100
    python benchmarks/token_label_demo.py --smoke                      # CPU check: synthetic data, a tiny model

Steps (each an ``rmt`` command, printed before it runs):

1. teacher: ``rmt train --config configs/fashion_mnist_gpu.yaml --epochs TEACHER_EPOCHS``;
2. maps: ``rmt token-labels make`` on the 60,000 training images (the teacher's EMA weights, its
   classifier head per token; the final grid of a 64-pixel image is 2x2);
3. student A: the same config for STUDENT_EPOCHS (CutMix on half the batches, as the config says);
4. student B: the same schedule with ``--token-label`` (MixToken instead of CutMix, the dense
   targets of the maps, the aux head); its test top-1 is the fused eval logits'.

Prints the test top-1 (EMA weights, the 10,000 test images) of the teacher and both students and
writes ``OUT/token_label_demo.json``. DIR holds the four Fashion-MNIST idx files
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, as Debian's dataset-fashion-mnist installs
them in /usr/share/datasets/fashion-mnist). At 64 pixels the final grid is 2x2, where the released
MixToken box rule (sides ``2 * (cut // 2)``) never cuts: ``--input-size 96`` (3x3) lets it cut, at
about twice the time per epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_mnist_gpu.yaml"
TINY = {"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 8], "head_hidden_size": 32}


def rmt(*args: str) -> None:
    cmd = [sys.executable, "-m", "rmt", *args]
    print("\n$ rmt " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def smoke_data(folder: Path) -> Path:
    """Fashion-MNIST-shaped idx files of noisy images whose class is where a bright square sits."""
    import numpy as np
    from rmt.classification.fashion_mnist import write_idx
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 4)
            images[i, 2 + 6 * r:8 + 6 * r, 2 + 6 * col:8 + 6 * col] = 230
        write_idx(images, folder / f"{prefix}-images-idx3-ubyte.gz")
        write_idx(labels.astype(np.uint8), folder / f"{prefix}-labels-idx1-ubyte.gz")
    return folder


def top1(run: Path) -> float:
    final = json.loads((run / "summary.json").read_text())["final"]
    return final.get("ema_top1", final.get("val_top1"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the four idx files")
    p.add_argument("--out", default=None, help="folder of the runs (default: runs/token-label-demo-TIMESTAMP)")
    p.add_argument("--teacher-epochs", type=float, default=25)
    p.add_argument("--student-epochs", type=float, default=18)
    p.add_argument("--input-size", type=int, default=64, help="image side for all three models (default 64)")
    p.add_argument("--smoke", action="store_true", help="CPU check: synthetic data, a tiny model, 1-2 epochs")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "runs" / f"token-label-demo-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    data = str(smoke_data(out / "data")) if args.smoke else args.data
    grid = math.ceil(args.input_size / 32)
    common = ["--config", str(CONFIG), "--data", data, "--output", str(out), "--input-size", str(args.input_size)]
    if args.smoke:
        common += ["--device", "cpu", "--amp", "none", "--no-cuda-graph", "--batch-size", "32", "--threads", "2",
                   "--model-kwargs", json.dumps(TINY), "--log-interval", "4", "--warmup-epochs", "0.5"]
        args.teacher_epochs, args.student_epochs = 1, 1
    start = time.perf_counter()
    rmt("train", *common, "--epochs", f"{args.teacher_epochs:g}", "--name", "teacher")
    teacher_s = time.perf_counter() - start
    rmt("token-labels", "make", str(out / "teacher" / "last.pth"), data, str(out / "maps"), "--dataset",
        "fashion-mnist", "--batch-size", "512", *(["--device", "cpu"] if args.smoke else []))
    maps_s = time.perf_counter() - start - teacher_s
    schedule = ["--epochs", f"{args.student_epochs:g}"]
    rmt("train", *common, *schedule, "--name", "student-plain")
    plain_s = time.perf_counter() - start - teacher_s - maps_s
    rmt("train", *common, *schedule, "--name", "student-token-labels", "--token-label", str(out / "maps"),
        "--token-label-size", str(grid), "--cutmix", "0")
    wall = time.perf_counter() - start
    result = dict(
        input_size=args.input_size, grid=f"{grid}x{grid}", teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs, smoke=args.smoke,
        teacher_top1=top1(out / "teacher"), student_plain_top1=top1(out / "student-plain"),
        student_token_labels_top1=top1(out / "student-token-labels"),
        teacher_map_stats=json.loads((out / "maps" / "token_labels.json").read_text()),
        seconds=dict(teacher=round(teacher_s), maps=round(maps_s), student_plain=round(plain_s),
                     student_token_labels=round(wall - teacher_s - maps_s - plain_s), total=round(wall)))
    try:
        import torch
        result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu"
    except Exception:  # noqa: BLE001 - the device name is a nicety
        pass
    (out / "token_label_demo.json").write_text(json.dumps(result, indent=2))
    rows = [("device", result.get("device", "?")), ("input / final grid", f"{args.input_size} px / {grid}x{grid}"),
            (f"teacher ({args.teacher_epochs:g} epochs) test top-1", f"{result['teacher_top1']:.2f}%"),
            (f"rmt_tiny, {args.student_epochs:g} epochs, no token labels", f"{result['student_plain_top1']:.2f}%"),
            (f"rmt_tiny, {args.student_epochs:g} epochs, token labels", f"{result['student_token_labels_top1']:.2f}%"),
            ("wall time", f"{wall:.0f} s (teacher {teacher_s:.0f}, maps {maps_s:.0f}, students "
                          f"{plain_s:.0f} + {wall - teacher_s - maps_s - plain_s:.0f})")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"written: {out / 'token_label_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
