"""`rmt segment train` under torchrun on CPU (gloo), through benchmarks/dense_multi_gpu.py's runner:
ranks in agreement, the loss curve of one process at equal total batch, kill -9 of a rank and resume.
(The detection counterpart is tests/test_detection.py::test_torchrun_two_processes_train_and_evaluate.)
"""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 8])


def _bench():
    spec = importlib.util.spec_from_file_location("dense_multi_gpu", ROOT / "benchmarks" / "dense_multi_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_segmentation_two_processes_agree_match_one_process_and_survive_kill_9(tmp_path):
    if not Path("/proc/self/environ").exists():
        pytest.skip("finding a torchrun worker's rank needs /proc")
    bench = _bench()
    args = argparse.Namespace(steps=6, batch=1, crop=48, num_images=8, workers=0, seg_model="rmt_tiny",
                              seg_head="fpn", backbone_kwargs=json.dumps(TINY))
    settings = bench.settings_for("cpu", args)
    result = bench.run_task("upernet", settings, tmp_path, kill=True, timeout=240)

    # DDP keeps the two ranks' parameters identical (all-reduced gradients, same optimizer steps)
    assert result["rank_max_param_diff"] == 0.0
    # one process at total batch 2 sees the same global batches; the curves differ only through
    # the per-rank BatchNorm statistics (SyncBatchNorm is CUDA-only) and per-rank pixel means
    curves = result["curves"]
    assert curves["steps"] == list(range(1, 7)) and None not in curves["two_processes"]
    for a, b in zip(curves["one_process"], curves["two_processes"]):
        assert abs(a - b) <= 0.1 * a, curves
    # kill -9 of rank 1 after the checkpoint of iteration 3, resume: the uninterrupted run exactly
    kill = result["kill"]
    assert kill["checkpoint_step"] >= settings["save_every"] == 3 and kill["torchrun_returncode"] != 0
    assert kill["weights_max_diff"] == 0.0 and kill["loss_max_diff"] == 0.0
    assert kill["final_loss_resumed"] == kill["final_loss_uninterrupted"]
    assert kill["rank_max_param_diff"] == 0.0
    lines = bench.markdown_table([result]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| upernet | rmt_tiny (fpn) | 6 | ")
