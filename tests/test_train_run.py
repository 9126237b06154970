"""Whole training runs on CPU: learning, exact resume after SIGKILL (also between the writes of
best.pth and last.pth), NaN handling, images that cannot be read or augmented, start errors,
two-process torchrun, and eval/predict on the trained checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rmt.bad_images import BadImageError
from rmt.classification.data import EpochSeededShuffle, ImageFolderDataset
from rmt.classification.train import TrainingDiverged, train
from rmt.cli import main as cli_main
from rmt.engine import load_checkpoint
from rmt.engine.metrics_log import read_jsonl

from train_utils import FailOnSize, TINY_MODEL, tiny_options, write_fashion_mnist_like, write_image_folder

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model that has learned 4 easy classes; the test split is the training split itself."""
    tmp = tmp_path_factory.mktemp("overfit")
    data = write_fashion_mnist_like(tmp / "data", n_train=64, n_test=16)
    summary = train(tiny_options(tmp, data, epochs=8, lr=3e-3, warmup_epochs=1.0, val_split="train",
                                 model_ema=True, ema_decay=0.9, checkpoint_every=0, log_interval=4))
    return tmp, data, summary


def test_overfits_a_tiny_dataset_and_writes_the_run(trained):
    tmp, _, summary = trained
    run = Path(summary["run_dir"])
    assert summary["final"]["val_top1"] == 100.0 and summary["final"]["val_images"] == 64
    records = read_jsonl(run / "log.jsonl")
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 8 and epochs[-1]["epoch_train_loss"] < 0.8 * epochs[0]["epoch_train_loss"]
    assert all(r["img_per_s"] > 0 for r in epochs)
    for name in ("config.yaml", "curves.png", "last.pth", "best.pth", "summary.json"):
        assert (run / name).is_file(), name
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["step"] == 32 and ckpt["epoch"] == 8 and ckpt["data_spec"]["class_names"][0] == "T-shirt/top"
    assert set(ckpt) >= {"model", "model_ema", "optimizer", "scheduler", "rng", "config"}


def test_eval_and_predict_on_the_trained_checkpoint(trained, capsys, tmp_path):
    tmp, data, summary = trained
    ckpt = Path(summary["run_dir"]) / "last.pth"
    assert cli_main(["eval", str(ckpt), "--no-ema", "--split", "train", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 64 and result["weights"] == "model"
    assert result["top1"] == pytest.approx(summary["final"]["val_top1"])
    assert Path(result["confusion_png"]).stat().st_size > 5000
    assert sum(map(sum, json.loads((tmp_path / "eval_last_train.json").read_text())["confusion"])) == 64

    from PIL import Image
    from rmt.classification import fashion_mnist
    images, labels = fashion_mnist.load_split(data, "train")
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(images[i].numpy()).save(paths[-1])
    assert cli_main(["predict", str(ckpt), *map(str, paths), "--top-k", "2", "--no-ema", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["top"][0]["label"] for r in out] == [fashion_mnist.CLASS_NAMES[int(y)] for y in labels[:6]]
    assert all(len(r["top"]) == 2 and r["top"][0]["probability"] >= r["top"][1]["probability"] for r in out)

    assert cli_main(["predict", str(ckpt), str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err

    # a folder with one unreadable image: named, and with --skip-bad-images the others are predicted
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in paths:
        p.rename(folder / p.name)
    broken = folder / "broken.png"
    broken.write_bytes(b"not an image")
    assert cli_main(["predict", str(ckpt), str(folder), "--no-ema"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"cannot read image '{broken}'" in captured.err and "--skip-bad-images" in captured.err
    assert cli_main(["predict", str(ckpt), str(folder), "--no-ema", "--json", "--skip-bad-images"]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert [r["image"] for r in records if "error" in r] == [str(broken)]
    assert [r["top"][0]["label"] for r in records if "top" in r] == [fashion_mnist.CLASS_NAMES[int(y)] for y in labels[:6]]
    assert f"skipped: cannot read image '{broken}'" in captured.err and "1 of 7 images skipped" in captured.err


def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    """Mixup, random erasing, crops, drop path and EMA all draw random numbers: a run killed with
    SIGKILL and resumed from its last checkpoint must end bitwise equal to an uninterrupted run."""
    data = write_fashion_mnist_like(tmp_path / "data", n_train=64)
    common = dict(mixup=0.8, cutmix=1.0, reprob=0.5, scale=[0.5, 1.0], hflip=0.5, drop_path=0.1,
                  model_ema=True, ema_decay=0.9, checkpoint_every=2, epochs=40, warmup_epochs=1.0)
    killed = tiny_options(tmp_path, data, name="killed", **common)
    args = [sys.executable, "-m", "rmt", "train"]
    for key, value in killed.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "runs" / "killed" / "log.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and any(r.get("step", 0) >= 3 for r in read_jsonl(log)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    saved_step = load_checkpoint(tmp_path / "runs" / "killed" / "last.pth")["step"]
    assert saved_step >= 2
    stop = saved_step + 5  # crosses an epoch boundary (4 steps per epoch)

    train({"resume": str(tmp_path / "runs" / "killed"), "max_steps": stop})
    reference = train(tiny_options(tmp_path, data, name="reference", max_steps=stop, **common))
    a = load_checkpoint(tmp_path / "runs" / "killed" / "last.pth")
    b = load_checkpoint(Path(reference["run_dir"]) / "last.pth")
    assert a["step"] == b["step"] == stop
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=64)
    with pytest.raises(TrainingDiverged, match=r"loss became (NaN|infinite).*last good checkpoint") as info:
        train(tiny_options(tmp_path, data, lr=1e12, epochs=5, checkpoint_every=1, warmup_epochs=0.0))
    run = tmp_path / "runs" / "run"
    ckpt = load_checkpoint(run / "last.pth")
    assert f"(step {ckpt['step']})" in str(info.value)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert read_jsonl(run / "log.jsonl")[-1]["event"] == "diverged"
    # and from the command line: one line naming the cause, no traceback
    out = subprocess.run([sys.executable, "-m", "rmt", "train", "--resume", str(run), "--lr", "1e12"],
                         env=_env(), capture_output=True, text=True)
    assert out.returncode == 1 and "loss became" in out.stderr and "Traceback" not in out.stderr


def test_unreadable_training_image_names_the_file_or_is_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=8)
    (root / "train" / "square" / "broken.png").write_bytes(b"\x89PNG truncated")  # 16 good + 1 bad: one batch
    opts = dict(dataset="folder", data=str(root), model="rmt_tiny", model_kwargs=TINY_MODEL, input_size=32,
                aa="none", mixup=0.0, cutmix=0.0, aug_repeats=0, batch_size=17, epochs=1, threads=1,
                device="cpu", output=str(tmp_path / "runs"), model_ema=False, warmup_epochs=0.0)
    with pytest.raises(RuntimeError, match=r"cannot read image '.*broken.png'.*--skip-bad-images"):
        train(dict(opts, name="strict", workers=1))
    summary = train(dict(opts, name="lenient", workers=0, skip_bad_images=True))
    epoch = [r for r in read_jsonl(Path(summary["run_dir"]) / "log.jsonl") if r["event"] == "epoch"][0]
    assert epoch["bad_images"] == 1 and summary["final"]["val_images"] == 16


def test_a_transform_failing_on_one_image_stops_with_a_checkpoint_or_is_skipped(tmp_path, monkeypatch, capsys):
    """The run stops on the chosen image (in a loader worker) naming it, its transform and the
    cause, after saving the steps trained before it; resumed with --skip-bad-images it goes on."""
    import rmt.classification.data as data_module
    from PIL import Image
    root = write_image_folder(tmp_path / "imgs", per_class=8)
    chosen = root / "train" / "square" / "chosen.png"
    Image.new("RGB", (41, 37), (200, 10, 10)).save(chosen)  # 17 training images: 4 steps of 4 per epoch
    index = [p for p, _ in ImageFolderDataset(root / "train").samples].index(str(chosen))
    # a seed that puts the chosen image into the second to fourth batch of the first epoch
    seed = next(s for s in range(100) if 4 <= list(EpochSeededShuffle(17, 0, 1, s)).index(index) < 16)
    position = list(EpochSeededShuffle(17, 0, 1, seed)).index(index)
    real = data_module.train_transform

    def failing_on_the_chosen_image(cfg, spec):
        transform = real(cfg, spec)
        transform.transforms.insert(0, FailOnSize((41, 37)))
        return transform
    monkeypatch.setattr(data_module, "train_transform", failing_on_the_chosen_image)
    opts = dict(dataset="folder", data=str(root), model="rmt_tiny", model_kwargs=TINY_MODEL, input_size=32,
                aa="rand-m9-mstd0.5-inc1", mixup=0.0, cutmix=0.0, aug_repeats=0, batch_size=4, epochs=2, threads=1,
                device="cpu", output=str(tmp_path / "runs"), name="run", model_ema=False, warmup_epochs=0.0,
                checkpoint_every=0, workers=1, seed=seed, log_interval=1)
    with pytest.raises(BadImageError, match=rf"cannot augment image '{chosen}': FailOnSize raised ValueError: this "
                                            rf"image is the chosen one. Training stopped after saving step "
                                            rf"{position // 4} to .*--skip-bad-images"):
        train(opts)
    run = tmp_path / "runs" / "run"
    assert load_checkpoint(run / "last.pth")["step"] == position // 4
    summary = train({"resume": str(run), "skip_bad_images": True})
    assert summary["steps"] == 8
    records = read_jsonl(run / "log.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 9))
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 2 and epochs[0]["bad_images"] >= 1 and epochs[0]["skipped_images"] == [str(chosen)]
    assert f"skipped: cannot augment image '{chosen}': FailOnSize" in capsys.readouterr().err


KILL_BETWEEN_WRITES = """
import os, signal, sys
from pathlib import Path
import rmt.classification.run_state as run_state
from rmt.classification.train import Trainer, train
Trainer.validate = lambda self, epoch: {"val_top1": [10.0, 20.0, 15.0][epoch]}  # epoch 2 is the best
real_save, previous = run_state.save_checkpoint, [None]

def save(state, path):  # the second file of the save at step 4 (end of epoch 2) is killed half written
    path = Path(path)
    if state is previous[0] and state["step"] == 4:
        path.with_name(f".{path.name}.tmp{os.getpid()}").write_bytes(b"PK" + bytes(4096))
        os.kill(os.getpid(), signal.SIGKILL)
    previous[0] = state
    return real_save(state, path)

run_state.save_checkpoint = save
train(eval(sys.argv[1]))
"""


def test_a_kill_between_the_writes_of_best_and_last_leaves_neither_stale(tmp_path, monkeypatch):
    """best.pth is written before the last.pth that records it: after a kill between the two, the
    resumed run ends with the best.pth (and log) of an uninterrupted run, and no partial file."""
    from rmt.classification.train import Trainer
    data = write_fashion_mnist_like(tmp_path / "data", n_train=32, n_test=16)
    common = dict(epochs=3, checkpoint_every=1, warmup_epochs=0.5)  # 2 steps per epoch
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_WRITES,
                             repr(tiny_options(tmp_path, data, name="killed", **common))],
                            env=_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "runs" / "killed"
    assert [p.name for p in run.glob(".*.tmp*")], "the kill left no partial file"
    assert load_checkpoint(run / "best.pth")["step"] == 4 and load_checkpoint(run / "last.pth")["step"] == 3

    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: {"val_top1": [10.0, 20.0, 15.0][epoch]})
    train({"resume": str(run)})
    reference = Path(train(tiny_options(tmp_path, data, name="reference", **common))["run_dir"])
    assert not list(run.glob(".*.tmp*"))
    a, b = load_checkpoint(run / "best.pth"), load_checkpoint(reference / "best.pth")
    assert a["step"] == b["step"] == 4 and a["best_top1"] == b["best_top1"] == 20.0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert load_checkpoint(run / "last.pth")["step"] == 6
    steps = [(r["event"], r["step"]) for r in read_jsonl(run / "log.jsonl")]
    assert steps == [(r["event"], r["step"]) for r in read_jsonl(reference / "log.jsonl")]


def test_start_errors_are_one_line_and_leave_no_run_directory(tmp_path, capsys):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=32, n_test=16)
    runs = tmp_path / "out" / "runs"
    base = ["train", "--dataset", "fashion-mnist", "--data", str(data), "--device", "cpu", "--output", str(runs),
            "--workers", "0", "--batch-size", "8"]
    assert cli_main([*base, "--model-kwargs", '{"depthz": [1, 1, 1, 1]}']) == 1
    err = capsys.readouterr().err
    assert err.startswith("rmt train: error: --model-kwargs: rmt_tiny has no argument 'depthz'; it takes ")
    assert "depths" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\nbatch_size: {\n")
    assert cli_main([*base, "--config", str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"rmt train: error: config file '{bad}' is not valid YAML at line 2")
    assert not (tmp_path / "out").exists()


TORCHRUN_SCRIPT = """
import sys, torch
from rmt.classification import config
from rmt.classification.train import Trainer, make_run_dir
from rmt.engine import cleanup_distributed, setup_distributed
options, out = eval(sys.argv[1]), sys.argv[2]
info = setup_distributed("cpu")
cfg = config.resolve(options)
trainer = Trainer(cfg, info, make_run_dir(cfg, info, None))
before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
batch = next(iter(trainer.data.train))[1]
trainer.fit()
torch.save({"before": before, "after": trainer.model.state_dict(), "labels": batch}, f"{out}/rank{info.rank}.pt")
cleanup_distributed()
"""


def test_two_process_torchrun_on_cpu_keeps_ranks_in_agreement(tmp_path):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=64)
    options = tiny_options(tmp_path, data, max_steps=2, reprob=0.5, scale=[0.5, 1.0], drop_path=0.1)
    script = tmp_path / "ddp.py"
    script.write_text(TORCHRUN_SCRIPT)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", str(script), repr(options), str(tmp_path)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    finally:  # never leave worker processes behind, whatever happened
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert not torch.equal(r0["labels"], r1["labels"])  # each rank trains on its own share
    changed = [k for k in r0["after"] if not torch.equal(r0["after"][k], r0["before"][k])]
    assert len(changed) > 10
    for k in r0["after"]:  # identical start, identical parameters after the optimizer steps
        assert torch.equal(r0["before"][k], r1["before"][k]), k
        if "running_" not in k and "num_batches" not in k:  # BatchNorm statistics stay per rank
            assert torch.equal(r0["after"][k], r1["after"][k]), k
    assert (tmp_path / "runs" / "run" / "last.pth").is_file()


def test_time_budget_sets_the_number_of_epochs_that_fits(tmp_path):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=64)
    start = time.perf_counter()
    summary = train(tiny_options(tmp_path, data, epochs=10_000, time_budget=0.15, batch_size=8, log_interval=4))
    wall = time.perf_counter() - start
    run = Path(summary["run_dir"])
    ckpt = load_checkpoint(run / "last.pth")
    chosen = ckpt["config"]
    assert chosen["time_budget"] is None and 0 < chosen["epochs"] < 10_000
    assert ckpt["step"] == round(chosen["epochs"] * 8)  # 8 steps per epoch; the last one may be cut short
    assert f"epochs: {json.dumps(chosen['epochs'])}" in (run / "config.yaml").read_text()
    assert wall < 0.15 * 60 + 6


def test_precision_accumulation_and_memory_options_train(tmp_path):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=64)
    summary = train(tiny_options(tmp_path, data, epochs=1, accum_steps=2, amp="bf16", clip_grad=1.0,
                                 channels_last=True, grad_checkpointing=True, model_ema=True))
    ckpt = load_checkpoint(Path(summary["run_dir"]) / "last.pth")
    assert ckpt["step"] == 2 and summary["final"]["val_images"] == 32  # 64 images / (16 x 2) per step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_eval_of_a_released_layout_checkpoint(tmp_path, capsys):
    """A file in the authors' layout (here: rmt_tiny with a 2-class head) evaluates with ImageNet
    preprocessing and gives the accuracy computed directly with timm's transforms."""
    import timm
    from rmt.checkpoint import ours_to_released
    from rmt.classification.data import DataSpec, ImageFolderDataset, eval_transform
    root = write_image_folder(tmp_path / "imgs", per_class=3)
    model = timm.create_model("rmt_tiny", num_classes=2).eval()
    torch.save({"model": ours_to_released(model.state_dict(), model)}, tmp_path / "released.pth")
    ds = ImageFolderDataset(root / "val", eval_transform(DataSpec()))
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        pred = model(x).argmax(1)
    expected = 100.0 * (pred == torch.tensor([t for _, t in ds.samples])).float().mean().item()
    assert cli_main(["eval", str(tmp_path / "released.pth"), "--data", str(root), "--json", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "rmt_tiny" and result["images"] == len(ds)
    assert result["top1"] == pytest.approx(expected)
    assert cli_main(["eval", str(tmp_path / "released.pth")]) == 1
    assert "needs --data" in capsys.readouterr().err


def test_cuda_graph_option_names_what_it_needs(tmp_path):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=32)
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device.*--accum-steps 1"):
        train(tiny_options(tmp_path, data, epochs=1, cuda_graph=True, accum_steps=2))


def test_block_graphs_option_refuses_fsdp(tmp_path):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=32)
    with pytest.raises(ValueError, match="--block-graphs .* --fsdp"):
        train(tiny_options(tmp_path, data, epochs=1, block_graphs=True, fsdp=True))


def test_block_graphs_are_on_by_default_where_they_apply():
    from rmt.classification.train import block_graphs_wanted
    base = dict(block_graphs=None, fsdp=False, cuda_graph=False, compile=False, grad_checkpointing=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert block_graphs_wanted(base, cuda) and not block_graphs_wanted(base, cpu)
    for takes_over in ("fsdp", "cuda_graph", "compile", "grad_checkpointing"):
        assert not block_graphs_wanted(dict(base, **{takes_over: True}), cuda), takes_over
    assert not block_graphs_wanted(dict(base, block_graphs=False), cuda)
    assert block_graphs_wanted(dict(base, block_graphs=True, compile=True), cuda)  # asked for explicitly
    assert not block_graphs_wanted(dict(base, block_graphs=True), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_follows_the_eager_run(tmp_path):
    """Same seed and data: the replayed graph trains like eager steps (losses and weights close)."""
    data = write_fashion_mnist_like(tmp_path / "data", n_train=128)
    runs = {}
    for graph in (False, True):
        opts = tiny_options(tmp_path, data, epochs=2, device="cuda", amp="bf16", pipeline="tensor", clip_grad=1.0,
                            model_ema=True, drop_path=0.0, cuda_graph=graph, name=f"graph{int(graph)}")
        summary = train(opts)
        runs[graph] = (read_jsonl(Path(summary["run_dir"]) / "log.jsonl"),
                       load_checkpoint(Path(summary["run_dir"]) / "last.pth"))
    losses = {g: [r["train_loss"] for r in log if r.get("event") == "train"] for g, (log, _) in runs.items()}
    assert len(losses[True]) == len(losses[False]) == 16
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < 0.05
    eager, graphed = runs[False][1]["model"], runs[True][1]["model"]
    worst = max(((graphed[k].float() - v.float()).norm() / v.float().norm().clamp_min(1e-6)).item()
                for k, v in eager.items() if v.is_floating_point() and v.numel() > 16)
    assert worst < 0.05
