"""Shared training machinery: atomic checkpoints (a full disk, killed writes), RNG round trips,
JSONL logs (cut back to a checkpoint's step on resume) and plots."""
import builtins
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from rmt.engine import (CheckpointWriteError, JsonlLogger, capture_rng_state, load_checkpoint, plot_curves,
                        remove_partial_writes, restore_rng_state, save_checkpoint)
from rmt.engine import state as engine_state
from rmt.engine.metrics_log import read_jsonl


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


def test_full_disk_during_a_save_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"step": 1, "w": torch.ones(4)}, path)
    real_open = builtins.open
    # /dev/full fails every write with ENOSPC, as a full disk does
    monkeypatch.setattr(engine_state, "open", lambda p, mode="r": real_open("/dev/full", mode), raising=False)
    with pytest.raises(CheckpointWriteError, match=r"the disk is full: writing checkpoint '.*last.pth' stopped "
                                                   r"after .* MiB left .*previous file is unchanged"):
        save_checkpoint({"step": 2, "w": torch.zeros(1 << 16)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pth"]
    assert issubclass(CheckpointWriteError, RuntimeError)  # what the command line prints as one line


def test_partial_writes_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.pth.tmp{dead_pid}"
    stale.write_bytes(b"PK half a checkpoint")
    live = tmp_path / f".best.pth.tmp{os.getpid()}"  # this process may still be writing it
    live.write_bytes(b"PK")
    other = tmp_path / ".notes.tmp"
    other.write_text("not ours")
    assert remove_partial_writes(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    log.log({"event": "config", "config": {}})
    for step in range(1, 7):
        log.log({"event": "train", "step": step, "train_loss": 1.0})
    log.log({"event": "epoch", "step": 4, "epoch": 1})
    (tmp_path / "log.jsonl").open("a").write('{"step": 7, "train_lo')  # torn by the kill
    assert log.drop_after(4) == 3  # steps 5, 6 and the torn line
    records = read_jsonl(tmp_path / "log.jsonl")
    assert [r.get("step") for r in records] == [None, 1, 2, 3, 4, 4]
    assert all(json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines())
    assert log.drop_after(4) == 0
