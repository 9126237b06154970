"""benchmarks/training_table.py: the rows, their peers (measured once per peer), speeds and targets."""
import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("training_table", BENCHMARKS / "training_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_unknown_rows_are_named(table, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert table.main(["--rows", "eager"]) == 0
    assert "skipped: no CUDA" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        table.main(["--rows", "eager,fast"])
    assert "unknown rows ['fast']" in capsys.readouterr().err


def test_speed_is_rmt_over_peer_throughput_for_rates_and_times(table):
    rows = table.ROWS_BY_KEY
    assert table.speed(rows["eager"], 1500.0, 2000.0) == pytest.approx(0.75)        # img/s: ours / peer
    assert table.speed(rows["backbone"], 40.0, 20.0) == pytest.approx(0.5)          # ms: peer / ours
    assert table.speed(rows["maskrcnn_s"], 0.1, 0.09) == pytest.approx(0.9)
    assert table.speed(rows["eager"], None, 2000.0) is None
    text = table.format_table([
        dict(key="backbone", ours_value=30.0, peer_value=20.0),        # 0.67x against a bar of 1/1.5
        dict(key="maskrcnn_t", ours_value=0.08, peer_value=0.06),       # 0.75x against 1.0x
        dict(key="compiled", ours_value=None, ours_note="RuntimeError: boom", peer_value=3763.0),
    ]).splitlines()
    assert text[2].endswith("| ms | 0.67x | >= 0.67x | yes |") and "| 30.0 |" in text[2]
    assert text[3].endswith("| s/step | 0.75x | >= 1.00x | no |") and "| 0.080 |" in text[3]
    assert "| RuntimeError: boom |" in text[4] and text[4].endswith("| - | >= 1.00x | - |")


def test_every_row_measures_both_sides_and_shares_peers(table, monkeypatch):
    """All rows through measure_row with the timing functions replaced: each peer is measured once
    for the rows that share it, values land on the right side, a failure becomes a note."""
    import detection
    import segmentation
    import training_step
    calls = []

    def fake_measure(name, mode, batch, device, warmup, iters):
        calls.append(("cls", name, mode))
        if mode == "compiled" and name == "rmt_small":
            raise RuntimeError("CUDA error: an illegal memory access")
        return dict(img_per_s=100.0 if name == "rmt_small" else 200.0, note="", peak_gib=1.0, setup_s=2.0)

    def fake_detection(name, detector, device, height, width, batch, steps, warmup):
        calls.append(("det", name, detector, width, height, batch))
        return dict(train_s_step=0.1 if name.startswith("rmt") else 0.05, train_peak_mib=2048.0)

    def fake_segmentation(name, head, device, size, batch, infer_batch, steps, warmup):
        calls.append(("seg", name, head, size, batch))
        return dict(train_img_s=150.0 if name.startswith("rmt") else 170.0, train_peak_gib=3.0)

    monkeypatch.setattr(training_step, "measure", fake_measure)
    monkeypatch.setattr(detection, "bench_one", fake_detection)
    monkeypatch.setattr(segmentation, "bench_one", fake_segmentation)
    monkeypatch.setattr(table, "_backbone_ms", lambda name, *a: (calls.append(("bb", name)), dict(value=10.0))[1])
    cache = {}
    results = [table.measure_row(row, torch.device("cpu"), 0, 1, cache) for row in table.ROWS]
    assert calls.count(("cls", "swin_tiny_patch4_window7_224", "eager")) == 1   # eager and block-graph rows
    assert calls.count(("det", "convnext_tiny", "mask_rcnn", 1333, 800, 2)) == 1   # RMT-T and RMT-S rows
    assert ("seg", "convnext_tiny", "upernet", 512, 16) in calls and ("cls", "rmt_small", "eager-blockgraphs") in calls
    by_key = {r["key"]: r for r in results}
    assert by_key["compiled"]["ours_value"] is None and "illegal memory access" in by_key["compiled"]["ours_note"]
    assert by_key["compiled"]["peer_value"] == 200.0
    assert by_key["maskrcnn_s"]["ours_value"] == 0.1 and by_key["maskrcnn_s"]["peer_value"] == 0.05
    assert by_key["maskrcnn_s"]["ours_peak_gib"] == 2.0
    assert by_key["upernet"]["ours_value"] == 150.0 and by_key["backbone"]["peer_value"] == 10.0
    assert len(table.format_table(results).splitlines()) == 2 + len(table.ROWS)


def test_backbone_row_runs_a_real_forward_and_backward(table):
    """The backbone row's own measurement (the others reuse the detection, segmentation and
    training-step scripts, tested beside them), at a CPU-sized input."""
    got = table._backbone_ms("rmt_tiny", torch.device("cpu"), 0, 1, size=(64, 96))
    assert got["value"] > 0
