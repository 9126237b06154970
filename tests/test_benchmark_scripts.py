"""The GPU benchmark scripts' code paths, run at a tiny size on CPU (Triton's interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmt.ops.triton_support import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_tiles_smoke_run_writes_a_row_per_kernel(tmp_path):
    out = tmp_path / "tiles.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_tiles.py"), "--device", "cpu",
                           "--batch", "1", "--smoke", "--iters", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    kernels = [r["kernel"] for r in rows]
    assert kernels == ["dwconv cpe 3x3", "dwconv lepe 5x5", "dwconv ffn 3x3", "layernorm forward",
                       "layernorm backward", "masa fwd row pass", "masa fwd full"]
    assert all(r["default_us"] > 0 and r["best_us"] <= r["default_us"] for r in rows)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_tiles_weight_gradient_sweep_has_a_cudnn_baseline(tmp_path):
    out = tmp_path / "wgrad.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_tiles.py"), "--device", "cpu",
                           "--batch", "1", "--smoke", "--iters", "1", "--kernels", "dwconv_wgrad",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in rows] == ["dwconv wgrad cpe 3x3", "dwconv wgrad lepe 5x5", "dwconv wgrad ffn 3x3"]
    assert all(r["default_us"] > 0 and r["baseline_us"] > 0 for r in rows)
