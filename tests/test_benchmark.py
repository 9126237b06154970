"""`rmt benchmark` rows on CPU: every model of the table runs at every size it is asked for."""
import math

import torch

from rmt.benchmark import measure


def test_swin_peer_is_built_for_the_benchmarked_size():
    """Swin fixes its input size at construction: the 1024x1024 row used to fail with a size assertion."""
    row = measure("swin_tiny_patch4_window7_224", None, "infer", 256, 1, torch.device("cpu"), warmup=0, iters=1)
    assert row.note == "" and row.img_per_s > 0


def test_convnext_peer_and_rmt_rows_at_a_non_default_size():
    cpu = torch.device("cpu")
    rows = [measure("convnext_tiny", None, "infer", 96, 1, cpu, warmup=0, iters=1),
            measure("rmt_tiny", "reference", "train", 64, 2, cpu, warmup=0, iters=1)]
    for row in rows:
        assert row.note == "", row.note
        assert row.img_per_s > 0 and math.isnan(row.peak_gib)  # peak memory is measured on CUDA only


def test_failure_is_reported_in_the_note():
    row = measure("rmt_tiny", "reference", "infer", 16, 1, torch.device("cpu"), warmup=0, iters=1)
    assert math.isnan(row.img_per_s) and row.note


def test_graphs_impl_rows_are_training_rows_and_unknown_impls_are_named(capsys):
    """``--impls graphs`` measures the training step with block graphs on (on CPU the blocks run their
    kernels eagerly); inference rows and extra sizes are not repeated for it."""
    from rmt.cli import main
    args = ["benchmark", "--device", "cpu", "--models", "rmt_tiny", "--peers", "", "--impls", "graphs",
            "--sizes", "40:1", "--compiled", "", "--train-batch", "1", "--warmup", "0", "--iters", "1"]
    assert main(args) == 0
    table = capsys.readouterr().out.split("\n\n")[-1]
    rows = [line for line in table.splitlines() if line.startswith("rmt_tiny")]
    assert len(rows) == 1 and "graphs" in rows[0] and "train" in rows[0]
    assert main(["benchmark", "--device", "cpu", "--impls", "fast,magic"]) == 1
    assert "--impls magic: choose from fast, reference, graphs" in capsys.readouterr().err
