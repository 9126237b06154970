"""Fashion-MNIST from its idx files (gzipped or not), as Debian's ``dataset-fashion-mnist`` installs
them or from any folder holding the four files.

The images are ``(N, 28, 28)`` uint8 grayscale; models see them resized to the chosen input size,
replicated to 3 channels and normalised with this data set's own mean and std.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
# pixel mean and std of the 60,000 training images (scaled to [0, 1])
MEAN = 0.2860
STD = 0.3530
SPLITS = {"train": "train", "test": "t10k", "val": "t10k", "t10k": "t10k"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in '{root}'; install Debian's "
        f"'{DEBIAN_PACKAGE}' package (apt-get install {DEBIAN_PACKAGE}) or pass --data DIR with "
        "the four idx files")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (unsigned-byte data, any number of dimensions) into a numpy array."""
    path = Path(path)
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"'{path}' is not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"'{path}' holds idx type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    expected = int(np.prod(dims)) if dims else 0
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise ValueError(f"'{path}' is truncated: header promises {expected} bytes, file holds {body.size}")
    return body.reshape(dims)


def write_idx(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 array as an idx file (gzipped when ``path`` ends in .gz); used by tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def load_split(root: Optional[str | Path] = None, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``split`` ("train" or "test")."""
    root = Path(root) if root else DEFAULT_DIR
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(SPLITS)}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder '{root}' does not exist; install Debian's '{DEBIAN_PACKAGE}' package "
            f"(apt-get install {DEBIAN_PACKAGE}) or pass --data DIR with the four idx files")
    prefix = SPLITS[split]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files in '{root}' disagree: images {images.shape}, labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
