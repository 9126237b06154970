"""Training with token labels: the label-map format, crops and flips of the maps, the loss, training
runs (learning, exact resume, bad maps, two processes) on CPU."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rmt.classification import label_maps
from rmt.classification.label_maps import LabelMapError
from rmt.classification.token_labels import (CropRecorder, TokenLabelLoss, TokenLabeler, TokenTargets,
                                             crop_targets, dense_score_maps)
from rmt.classification.train import train
from rmt.engine import load_checkpoint
from rmt.engine.metrics_log import read_jsonl

from train_utils import pattern_images, tiny_options, write_fashion_mnist_like, write_image_folder

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _map(k=3, h=4, w=5, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(k, h, w, generator=g) * 3
    indices = torch.stack([torch.randperm(classes, generator=g)[:k] for _ in range(h * w)], 1).view(k, h, w)
    return scores, indices


# ------------------------------------------------------------------------------------------------
# the format
# ------------------------------------------------------------------------------------------------

def test_map_files_round_trip_and_bad_files_name_image_and_file(tmp_path):
    scores, indices = _map()
    path = tmp_path / "cls" / "img.pt"
    label_maps.write_map(path, scores, indices)
    raw = torch.load(path, weights_only=True)
    assert raw.dtype == torch.float16 and raw.shape == (2, 3, 4, 5)  # the published maps' layout
    got = label_maps.read_map(path, "train/cls/img.JPEG", 10)
    assert torch.equal(got[1].long(), indices) and torch.equal(got[0], scores.half().float())
    assert label_maps.map_path("maps", "data/train/cls/img.v2.JPEG", "data/train") == Path("maps/cls/img.pt")

    cases = {"truncated": lambda p: p.write_bytes(path.read_bytes()[:50]),
             "text": lambda p: p.write_text("not a tensor"),
             "shape": lambda p: torch.save(torch.zeros(3, 5, 4, 4), p),
             "object": lambda p: torch.save({"scores": torch.zeros(2)}, p),
             "indices": lambda p: torch.save(torch.stack([scores, indices.float() + 20]), p),
             "fraction": lambda p: torch.save(torch.stack([scores, indices.float() + 0.5]), p),
             "nan": lambda p: torch.save(torch.stack([scores * float("nan"), indices.float()]), p)}
    for name, write in cases.items():
        bad = tmp_path / f"{name}.pt"
        write(bad)
        with pytest.raises(LabelMapError, match=rf"image 'x/{name}.png'.*'{bad}'"):
            label_maps.read_map(bad, f"x/{name}.png", 10)
    with pytest.raises(LabelMapError, match="does not exist"):
        label_maps.read_map(tmp_path / "missing.pt", "x/missing.png", 10)


def test_check_maps_before_training(tmp_path):
    pairs = []
    for i in range(6):
        path = tmp_path / f"{i}.pt"
        label_maps.write_map(path, *_map(seed=i))
        pairs.append((f"img{i}.png", path))
    assert label_maps.check_maps(pairs, 10, progress=False) == (2, 3, 4, 5)
    label_maps.write_map(pairs[3][1], *_map(h=2, seed=3))
    with pytest.raises(LabelMapError, match=r"img3.png.*shape \(2, 3, 2, 5\)"):
        label_maps.check_maps(pairs, 10, progress=False)
    assert label_maps.check_maps(pairs, 10, read=False, progress=False) == (2, 3, 4, 5)  # existence only
    pairs[3][1].unlink()
    pairs[5][1].unlink()
    with pytest.raises(LabelMapError, match=r"image 'img3.png'.*3.pt' does not exist \(2 of 6 maps are missing\)"):
        label_maps.check_maps(pairs, 10, read=False, progress=False)


def test_stacked_maps(tmp_path):
    maps = torch.stack([torch.stack([s, i.float()]) for s, i in (_map(seed=j) for j in range(5))])
    label_maps.write_packed(tmp_path / "train.pt", maps.half())
    assert torch.equal(label_maps.read_packed(tmp_path / "train.pt", 4, 10), maps[:4].half().float())
    with pytest.raises(LabelMapError, match="holds maps of 5 images, the split has 6"):
        label_maps.read_packed(tmp_path / "train.pt", 6, 10)
    maps[2, 1, 0, 0, 0] = 12
    label_maps.write_packed(tmp_path / "train.pt", maps)
    with pytest.raises(LabelMapError, match="image 2: its token-label map"):
        label_maps.read_packed(tmp_path / "train.pt", 5, 10)


# ------------------------------------------------------------------------------------------------
# crops, flips and the loss
# ------------------------------------------------------------------------------------------------

def test_dense_score_maps_scatter_the_top_k():
    scores, indices = _map()
    full = dense_score_maps(torch.stack([scores, indices.float()]).unsqueeze(0), 10)[0]
    for r in range(4):
        for c in range(5):
            want = torch.zeros(10)
            want[indices[:, r, c]] = scores[:, r, c]
            assert torch.equal(full[:, r, c], want)


def test_crop_targets_of_a_cell_aligned_crop_are_the_cells():
    """A crop covering whole cells, read out at one target per cell: the cells themselves (flipped
    where the image was), softmaxed and smoothed."""
    maps = torch.stack([torch.stack([s, i.float()]) for s, i in (_map(h=4, w=4, seed=j) for j in range(2))])
    boxes = torch.tensor([[0.25, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])  # rows 1-2, cols 2-3; the whole map
    flips = torch.tensor([True, False])
    cls, dense = crop_targets(maps, boxes, flips, 10, 2, smoothing=0.1)
    full = dense_score_maps(maps, 10)
    cells = [full[0, :, 1:3, 2:4].flip(2), F.avg_pool2d(full[1:], 2)[0]]  # 4x4 map read at 2x2: 2x2 means
    for b in range(2):
        want = cells[b].softmax(0) * 0.9 + 0.01
        assert torch.allclose(dense[b], want.flatten(1).T, atol=1e-6)
    assert torch.allclose(cls[1], full[1].mean((1, 2)).softmax(0) * 0.9 + 0.01, atol=1e-6)
    assert torch.allclose(dense.sum(-1), torch.ones(2, 4)) and torch.allclose(cls.sum(-1), torch.ones(2))


def test_crop_targets_of_any_crop_sample_the_map_at_the_target_centres():
    """On a map whose scores are linear in the cell position, RoIAlign of any box is exact: target
    (p, q) is the score at that target's centre in the image, mirrored when flipped."""
    h, w, classes, size = 6, 8, 3, 4
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    a, b, d = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.1, 0.25, -0.15]), torch.tensor([0.0, 1.0, -1.0])
    scores = a.view(3, 1, 1) * rows + b.view(3, 1, 1) * cols + d.view(3, 1, 1)
    maps = torch.stack([scores, torch.arange(3).float().view(3, 1, 1).expand(3, h, w)]).unsqueeze(0).repeat(2, 1, 1, 1, 1)
    box = torch.tensor([0.2, 0.15, 0.55, 0.6])                 # top, left, height, width (inside the centres)
    _, dense = crop_targets(maps, box.repeat(2, 1), torch.tensor([False, True]), classes, size, smoothing=0.0)
    p = torch.arange(size).float()
    y = (box[0] + (p + 0.5) / size * box[2]) * h - 0.5          # centre of each target in map coordinates
    x = (box[1] + (p + 0.5) / size * box[3]) * w - 0.5
    want = a.view(3, 1, 1) * y.view(1, -1, 1) + b.view(3, 1, 1) * x.view(1, 1, -1) + d.view(3, 1, 1)
    assert torch.allclose(dense[0], want.softmax(0).flatten(1).T, atol=1e-5)
    assert torch.allclose(dense[1], want.flip(2).softmax(0).flatten(1).T, atol=1e-5)


def test_crop_recorder_reports_the_crop_and_flip_the_image_got():
    from PIL import Image
    from timm.data import create_transform
    from torchvision.transforms import functional as TF
    img = Image.fromarray(pattern_images(1, size=48, seed=3)[0][0]).convert("RGB").resize((60, 48))
    transform = create_transform(32, is_training=True, scale=(0.2, 1.0), hflip=0.5, color_jitter=None,
                                 interpolation="bilinear", re_prob=0.0)
    recorder = CropRecorder(transform)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = recorder(img)
        (top, left, height, width), flipped = recorder.last
        i, j, hh, ww = round(top * 48), round(left * 60), round(height * 48), round(width * 60)
        want = TF.resized_crop(img, i, j, hh, ww, [32, 32], TF.InterpolationMode.BILINEAR)
        want = TF.normalize(TF.to_tensor(TF.hflip(want) if flipped else want), transform.transforms[-1].mean,
                            transform.transforms[-1].std)
        assert torch.equal(out, want)
        flips.add(flipped)
    assert flips == {True, False}


def test_tensor_pipeline_box_is_the_crop_it_sampled():
    """Device-held batches: the reported box (and flip) is where each output pixel was sampled."""
    from rmt.classification.data import DataSpec
    from rmt.classification.tensor_data import TensorBatches
    from rmt.engine import DistInfo
    n, side = 8, 64
    ramp = ((torch.arange(side) + 0.5) / side * 255).round().to(torch.uint8)
    images = ramp.view(1, 1, side).expand(n, side, side).contiguous()  # pixel value ~ column position
    spec = DataSpec(input_size=16, mean=[0.0] * 3, std=[1.0] * 3, interpolation="bilinear")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = TensorBatches(images, torch.zeros(n, dtype=torch.long), n, spec, info, 0, train=True,
                            scale=(0.3, 0.8), ratio=(0.7, 1.4), hflip=0.5)
    torch.manual_seed(0)
    x, box = batches._augment(images.unsqueeze(1).float() / 255)
    cols = (torch.arange(16) + 0.5) / 16
    for b in range(n):
        left, width, flip = box[b, 1], box[b, 3], box[b, 4]
        where = left + (cols if flip > 0 else cols.flip(0)) * width
        assert torch.allclose(x[b, 0, 8], where, atol=2.5 / 255), b
    assert set(box[:, 4].tolist()) == {-1.0, 1.0}


def test_loss_follows_the_formula():
    torch.manual_seed(0)
    b, h, w, classes = 4, 3, 2, 5
    logits, aux = torch.randn(b, classes), torch.randn(b, h * w, classes)
    targets = torch.rand(b, 1 + h * w, classes).softmax(-1)
    loss_fn = TokenLabelLoss()
    for box in ([0, 0, 0, 0], [1, 0, 3, 1], [0, 0, 3, 2]):
        box = torch.tensor(box)
        lam = 1 - (box[2] - box[0]) * (box[3] - box[1]) / (h * w)
        t = lam * targets[:, 0] + (1 - lam) * targets.flip(0)[:, 0]
        ce = lambda x, y: -(y * x.log_softmax(-1)).sum(-1).mean()  # noqa: E731
        want = ce(logits, t) + 0.5 * ce(aux.reshape(-1, classes), targets[:, 1:].reshape(-1, classes))
        assert torch.allclose(loss_fn((logits, aux, box), targets), want, atol=1e-6)
    with pytest.raises(ValueError, match="token-label-size"):
        loss_fn((logits, aux, box), targets[:, :3])


def test_labeler_packs_class_and_dense_targets():
    maps = torch.stack([torch.stack([s, i.float()]) for s, i in (_map(h=2, w=2, seed=j) for j in range(3))])
    batch = TokenTargets(torch.tensor([1, 2, 3]), maps, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3),
                         torch.zeros(3, dtype=torch.bool))
    packed = TokenLabeler(10, 2, 0.1, "teacher")(batch)
    cls, dense = crop_targets(maps, batch.boxes, batch.flips, 10, 2, 0.1)
    assert packed.shape == (3, 5, 10) and torch.equal(packed[:, 0], cls) and torch.equal(packed[:, 1:], dense)
    truth = TokenLabeler(10, 2, 0.1, "truth")(batch)
    assert torch.allclose(truth[:, 0], F.one_hot(batch.labels, 10) * 0.9 + 0.01) and torch.equal(truth[:, 1:], dense)


# ------------------------------------------------------------------------------------------------
# training runs
# ------------------------------------------------------------------------------------------------

def _teacher_maps(labels, grid=4, classes=10, k=5):
    """Maps of a teacher that knows the label everywhere: (N, 2, k, grid, grid)."""
    n = len(labels)
    indices = torch.stack([torch.cat([torch.tensor([int(y)]), torch.tensor([c for c in range(classes) if c != y][:k - 1])])
                           for y in labels]).float()
    scores = torch.tensor([6.0, 1.0, 0.5, 0.2, 0.1][:k])
    maps = torch.stack([scores.view(1, k).expand(n, k), indices], 1)
    return maps.view(n, 2, k, 1, 1).expand(-1, -1, -1, grid, grid).contiguous()


def _fashion_with_maps(tmp_path, n_train=64):
    data = write_fashion_mnist_like(tmp_path / "data", n_train=n_train, n_test=16)
    from rmt.classification import fashion_mnist
    _, labels = fashion_mnist.load_split(data, "train")
    (tmp_path / "maps").mkdir()
    label_maps.write_packed(tmp_path / "maps" / "train.pt", _teacher_maps(labels).half())
    return data, tmp_path / "maps"


TL = dict(input_size=64, token_label_size=2, hflip=0.5, scale=[0.5, 1.0])


def test_training_with_token_labels_lowers_the_loss_and_evaluates_fused(tmp_path, capsys):
    data, maps = _fashion_with_maps(tmp_path)
    summary = train(tiny_options(tmp_path, data, token_label=str(maps), epochs=6, lr=3e-3, warmup_epochs=1.0,
                                 val_split="train", model_ema=True, ema_decay=0.9, log_interval=4, **TL))
    run = Path(summary["run_dir"])
    epochs = [r for r in read_jsonl(run / "log.jsonl") if r["event"] == "epoch"]
    assert epochs[-1]["epoch_train_loss"] < 0.8 * epochs[0]["epoch_train_loss"]
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["config"]["mixup"] == ckpt["config"]["cutmix"] == 0.0  # MixToken takes their place
    assert "aux_head.weight" in ckpt["model"] and "aux_head.weight" in ckpt["model_ema"]
    # eval and predict rebuild the token-label model and give its fused eval logits
    from rmt.cli import main as cli_main
    from rmt.classification.predict import load_classifier
    clf = load_classifier(run / "last.pth", prefer_ema=False)
    assert clf.model.aux_head is not None and not clf.model.training
    assert cli_main(["eval", str(run / "last.pth"), "--no-ema", "--split", "train", "--json", "--out", str(tmp_path)]) == 0
    assert '"images": 64' in capsys.readouterr().out


def test_folder_data_with_per_image_maps_and_bad_maps_stop_before_the_first_step(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    from rmt.classification.data import ImageFolderDataset
    ds = ImageFolderDataset(root / "train")
    for path, label in ds.samples:
        scores = torch.tensor([5.0, 1.0]).view(2, 1, 1).expand(2, 3, 3)
        indices = torch.tensor([label, 1 - label]).view(2, 1, 1).expand(2, 3, 3)
        label_maps.write_map(label_maps.map_path(tmp_path / "maps", path, root / "train"), scores, indices)
    opts = dict(dataset="folder", token_label=str(tmp_path / "maps"), token_label_size=2,
                input_size=64, epochs=1, batch_size=4, hflip=0.5, aug_repeats=2)
    summary = train(tiny_options(tmp_path, root, name="ok", **opts))
    assert load_checkpoint(Path(summary["run_dir"]) / "last.pth")["step"] == 2  # 8 images, batches of 4

    victim = label_maps.map_path(tmp_path / "maps", ds.samples[2][0], root / "train")
    victim.write_bytes(b"\x00" * 10)
    for name, extra in (("corrupt", {}), ("missing", {"token_label_check": False})):
        if name == "missing":
            victim.unlink()
        with pytest.raises(LabelMapError, match=rf"image '{ds.samples[2][0]}'.*'{victim}'"):
            train(tiny_options(tmp_path, root, name=name, **opts, **extra))
        assert not (tmp_path / "runs" / name / "last.pth").exists()
        assert not any(r["event"] == "train" for r in read_jsonl(tmp_path / "runs" / name / "log.jsonl")) \
            if (tmp_path / "runs" / name / "log.jsonl").exists() else True


def test_option_errors(tmp_path):
    data, maps = _fashion_with_maps(tmp_path, n_train=32)
    with pytest.raises(ValueError, match="MixToken instead of mixup and cutmix.*--cutmix 1"):
        train(tiny_options(tmp_path, data, token_label=str(maps), cutmix=1.0, **TL))
    with pytest.raises(ValueError, match="--token-label-size 7 must equal .* 2x2 at --input-size 64"):
        train(tiny_options(tmp_path, data, token_label=str(maps), **dict(TL, token_label_size=7)))
    with pytest.raises(ValueError, match="aux head .* --token-label"):
        train(tiny_options(tmp_path, data, model_kwargs=dict(tiny_options(tmp_path, data)["model_kwargs"],
                                                             use_aux_head=True)))


def test_resume_mid_epoch_is_bit_exact_with_token_labels(tmp_path):
    """MixToken boxes, crops, flips, drop path and EMA: stopping mid-epoch and resuming ends bitwise
    where an uninterrupted run does."""
    data, maps = _fashion_with_maps(tmp_path)
    common = dict(token_label=str(maps), drop_path=0.1, model_ema=True, ema_decay=0.9, reprob=0.5,
                  epochs=4, warmup_epochs=1.0, **dict(TL, input_size=96, token_label_size=3))
    train(tiny_options(tmp_path, data, name="split", max_steps=6, **common))
    train({"resume": str(tmp_path / "runs" / "split"), "max_steps": 11})
    train(tiny_options(tmp_path, data, name="whole", max_steps=11, **common))
    a, b = (load_checkpoint(tmp_path / "runs" / n / "last.pth") for n in ("split", "whole"))
    assert a["step"] == b["step"] == 11 and a["step_in_epoch"] == 3
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


TORCHRUN_SCRIPT = """
import sys, torch
from rmt.classification import config
from rmt.classification.train import Trainer, make_run_dir
from rmt.engine import cleanup_distributed, setup_distributed
options, out = eval(sys.argv[1]), sys.argv[2]
info = setup_distributed("cpu")
cfg = config.resolve(options)
trainer = Trainer(cfg, info, make_run_dir(cfg, info, None))
full = lambda: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                for k, v in trainer.model.state_dict().items()}
before = full()
labels = next(iter(trainer.data.train))[1].labels
trainer.fit()
torch.save({"before": before, "after": full(), "labels": labels}, f"{out}/rank{info.rank}.pt")
cleanup_distributed()
"""


def test_two_processes_with_fsdp_and_token_labels_agree(tmp_path):
    """FSDP2-sharded (the DDP path runs the same script with fsdp=False)."""
    data, maps = _fashion_with_maps(tmp_path)
    options = tiny_options(tmp_path, data, token_label=str(maps), max_steps=2, fsdp=True, model_ema=True, **TL)
    script = tmp_path / "ddp.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(script), repr(options), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert not torch.equal(r0["labels"], r1["labels"])
    assert not torch.equal(r0["after"]["aux_head.weight"], r0["before"]["aux_head.weight"])
    for k in r0["after"]:
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(r0["after"][k], r1["after"][k]), k


# ------------------------------------------------------------------------------------------------
# rmt token-labels make
# ------------------------------------------------------------------------------------------------

def test_make_writes_maps_that_train_and_match_the_teacher(tmp_path, capsys):
    """Per-image files for an image folder, stacked maps for the idx files; each map is the top-k of
    the teacher's per-token head logits, whose token mean is the teacher's own output."""
    from rmt.cli import main as cli_main
    from rmt.classification.data import ImageFolderDataset
    from rmt.classification.make_token_labels import token_logits
    from rmt.classification.predict import load_classifier
    from timm.data import create_transform
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    folder = dict(dataset="folder", input_size=64, batch_size=4)
    teacher = Path(train(tiny_options(tmp_path, root, name="teacher", max_steps=2, **folder))["run_dir"]) / "last.pth"
    out = tmp_path / "maps"
    assert cli_main(["token-labels", "make", str(teacher), str(root), str(out), "--device", "cpu", "--batch-size", "3",
                     "--workers", "0"]) == 0
    assert "wrote 8 label maps (top-2, grid 2x2, teacher's classifier head per token)" in capsys.readouterr().out
    clf = load_classifier(teacher, device="cpu")
    ds = ImageFolderDataset(root / "train", create_transform(64, crop_pct=1.0, crop_mode="squash",
                                                             interpolation="bicubic", mean=clf.spec.mean,
                                                             std=clf.spec.std))
    x = torch.stack([ds[i][0] for i in range(3)])
    with torch.no_grad():
        logits = token_logits(clf.model, x)
        assert torch.allclose(logits.mean((1, 2)), clf.model(x), atol=1e-5)
    for i in range(3):
        got = label_maps.read_map(label_maps.map_path(out, ds.samples[i][0], root / "train"), "x", 2)
        top = logits[i].topk(2, dim=-1)
        assert torch.equal(got[1].long(), top.indices.permute(2, 0, 1))
        assert torch.allclose(got[0], top.values.permute(2, 0, 1), atol=1e-2)  # stored as float16
    mtime = label_maps.map_path(out, ds.samples[0][0], root / "train").stat().st_mtime_ns
    assert cli_main(["token-labels", "make", str(teacher), str(root), str(out), "--device", "cpu"]) == 0
    assert "wrote 0 label maps" in capsys.readouterr().out  # an interrupted run continues, nothing redone
    assert label_maps.map_path(out, ds.samples[0][0], root / "train").stat().st_mtime_ns == mtime
    student = train(tiny_options(tmp_path, root, name="student", token_label=str(out), token_label_size=2,
                                 epochs=1, **folder))
    assert load_checkpoint(Path(student["run_dir"]) / "last.pth")["step"] == 2

    data = write_fashion_mnist_like(tmp_path / "fm", n_train=32, n_test=16)
    fm_teacher = Path(train(tiny_options(tmp_path, data, name="fm_teacher", max_steps=1, input_size=64))["run_dir"])
    assert cli_main(["token-labels", "make", str(fm_teacher / "last.pth"), str(data), str(tmp_path / "fm_maps"),
                     "--dataset", "fashion-mnist", "--device", "cpu"]) == 0
    stacked = torch.load(tmp_path / "fm_maps" / "train.pt", weights_only=True)
    assert stacked.shape == (32, 2, 5, 2, 2) and stacked.dtype == torch.float16
    assert cli_main(["token-labels", "make", str(teacher), str(data), str(tmp_path / "bad"), "--dataset",
                     "fashion-mnist", "--device", "cpu"]) == 1
    assert "has 2 classes, the data set 10" in capsys.readouterr().err
