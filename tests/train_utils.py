"""Small data and options shared by the classification tests."""
from pathlib import Path

import numpy as np

from rmt.classification.fashion_mnist import write_idx

# a few thousand parameters per stage: every code path of rmt_tiny, a fraction of the compute
TINY_MODEL = {"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 8],
              "head_hidden_size": 32}


def pattern_images(n: int, classes: int = 4, seed: int = 0, size: int = 28):
    """Noisy images whose class is the quadrant holding a bright square: ``(n, size, size)`` uint8."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = (rng.random((n, size, size)) * 60).astype(np.uint8)
    half = size // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        images[i, 2 + r * half:half - 2 + r * half, 2 + col * half:half - 2 + col * half] = 230
    return images, labels.astype(np.uint8)


def write_fashion_mnist_like(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Four idx files in Fashion-MNIST's naming (train gzipped, test plain, as both occur)."""
    root.mkdir(parents=True, exist_ok=True)
    x, y = pattern_images(n_train, seed=seed)
    write_idx(x, root / "train-images-idx3-ubyte.gz")
    write_idx(y, root / "train-labels-idx1-ubyte.gz")
    x, y = pattern_images(n_test, seed=seed + 1)
    write_idx(x, root / "t10k-images-idx3-ubyte")
    write_idx(y, root / "t10k-labels-idx1-ubyte")
    return root


def write_image_folder(root: Path, per_class: int = 4, classes=("circle", "square"), seed: int = 0) -> Path:
    """``root/{train,val}/CLASS/i.png`` RGB images of 36x36 pixels."""
    from PIL import Image
    x, y = pattern_images(per_class * len(classes) * 2, classes=len(classes), seed=seed, size=36)
    counts = {}
    for i, (img, label) in enumerate(zip(x, y)):
        split = "train" if i % 2 == 0 else "val"
        folder = root / split / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        counts[(split, label)] = counts.get((split, label), 0) + 1
        Image.fromarray(img).convert("RGB").save(folder / f"{i:03d}.png")
    for split in ("train", "val"):  # every class present in both splits
        for label, name in enumerate(classes):
            if not counts.get((split, label)):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[0]).convert("RGB").save(root / split / name / "extra.png")
    return root


def tiny_options(tmp_path: Path, data: Path, **overrides):
    """Options of ``rmt train`` for a fast CPU run on Fashion-MNIST-like idx files."""
    options = dict(dataset="fashion-mnist", data=str(data), model="rmt_tiny", model_kwargs=TINY_MODEL,
                   aa="none", mixup=0.0, cutmix=0.0, aug_repeats=0, reprob=0.0, hflip=0.0, batch_size=16, epochs=2,
                   warmup_epochs=0.0, lr=2e-3, model_ema=False, threads=1, device="cpu", log_interval=1,
                   output=str(tmp_path / "runs"), name="run", workers=0)
    options.update(overrides)
    return options


class FailOnSize:
    """A transform step that fails on images of one size: a way to choose the image it fails on."""

    def __init__(self, size):
        self.size = tuple(size)

    def __call__(self, img):
        if img.size == self.size:
            raise ValueError("this image is the chosen one")
        return img
