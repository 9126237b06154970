"""Shared training machinery: atomic checkpoints, RNG round trips, JSONL logs and plots."""
import random

import numpy as np
import torch

from rmt.engine import (JsonlLogger, capture_rng_state, load_checkpoint, plot_curves,
                        restore_rng_state, save_checkpoint)


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    save_checkpoint({"rng": state}, tmp_path / "c.pth")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_atomic_save_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"step": 1, "w": torch.ones(2)}, path)
    save_checkpoint({"step": 2, "w": torch.zeros(2)}, path)
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_jsonl_log_and_plot(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    for step in range(5):
        log.log({"step": step, "train_loss": 1.0 / (step + 1), "lr": 0.1 * step})
    (tmp_path / "log.jsonl").open("a").write('{"step": 5, "train_lo')  # torn last line
    png = plot_curves(tmp_path / "log.jsonl", tmp_path / "curves.png",
                      {"loss": ["train_loss"], "lr": ["lr"]})
    assert png.stat().st_size > 1000
    disabled = JsonlLogger(tmp_path / "other.jsonl", enabled=False)
    disabled.log({"step": 0})
    assert not (tmp_path / "other.jsonl").exists()
