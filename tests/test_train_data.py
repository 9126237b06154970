"""Classification data: idx files, the on-device batch pipeline, resumable sample order with
per-sample augmentation seeds, the recipe's RandAugment under the installed Pillow, images that
cannot be read or augmented, webdataset shards, and the option table."""
import gzip
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rmt.bad_images import SkippedImage
from rmt.classification import config, fashion_mnist
from rmt.classification.augment import augment_ops, posterize
from rmt.classification.data import (BadImageError, DataSpec, ImageFolderDataset, LoaderBatches, build_data,
                                     eval_transform, train_transform)
from rmt.classification.tensor_data import TensorBatches, batch_random_erase
from rmt.engine import DistInfo

from train_utils import FailOnSize, pattern_images, write_fashion_mnist_like, write_image_folder

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_idx_round_trip_and_errors(tmp_path):
    x, y = pattern_images(5)
    for name in ("a.gz", "b"):
        fashion_mnist.write_idx(x, tmp_path / name)
        assert np.array_equal(fashion_mnist.read_idx(tmp_path / name), x)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_mnist.read_idx(tmp_path / "bad")
    raw = gzip.open(tmp_path / "a.gz").read()
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load_split(tmp_path / "nowhere", "train")
    root = write_fashion_mnist_like(tmp_path / "fm", n_train=12, n_test=6)
    images, labels = fashion_mnist.load_split(root, "test")
    assert images.shape == (6, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64


@pytest.mark.skipif(not (fashion_mnist.DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist_matches_constants():
    images, labels = fashion_mnist.load_split(None, "test")
    assert images.shape == (10000, 28, 28) and set(labels.tolist()) == set(range(10))
    train, _ = fashion_mnist.load_split(None, "train")
    pixels = train.double() / 255
    assert abs(pixels.mean().item() - fashion_mnist.MEAN) < 1e-3 and abs(pixels.std().item() - fashion_mnist.STD) < 1e-3


def _spec(size=32):
    return DataSpec(input_size=size, mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0, interpolation="bilinear",
                    grayscale=True, class_names=list("abcd"), pipeline="tensor")


def test_tensor_batches_eval_is_a_normalised_resize_and_train_order_is_per_epoch():
    x, y = pattern_images(40)
    images, labels = torch.from_numpy(x), torch.from_numpy(y).long()
    val = TensorBatches(images, labels, 16, _spec(), CPU, seed=0, train=False)
    got = torch.cat([b for b, _ in val])
    ref = torch.nn.functional.interpolate(images[:, None].float() / 255, size=(32, 32), mode="bilinear",
                                          align_corners=False)
    assert got.shape == (40, 3, 32, 32) and len(val) == 3
    torch.testing.assert_close(got, ((ref - 0.5) / 0.25).expand(-1, 3, -1, -1))

    # identity crops (scale 1, ratio 1, no flip) reproduce the evaluation images exactly
    train = TensorBatches(images, labels, 8, _spec(), CPU, seed=3, train=True)
    order = torch.cat([lab for _, lab in train])
    batches = list(train)
    assert len(batches) == 5 and all(b.shape == (8, 3, 32, 32) for b, _ in batches)
    for b, lab in batches:
        dist = (got[None] - b[:, None]).abs().flatten(2).amax(2)  # (batch, 40)
        assert (dist.min(1).values < 1e-4).all()
        assert torch.equal(labels[dist.argmin(1)], lab)
    train.set_epoch(1)
    assert not torch.equal(order, torch.cat([lab for _, lab in train]))
    train.set_epoch(0, skip_batches=2)
    assert torch.equal(torch.cat([lab for _, lab in train]), order[16:])

    # two ranks split the epoch's order between them
    ranks = [TensorBatches(images, labels, 4, _spec(), DistInfo(r, 2, r, torch.device("cpu")), 3, True)
             for r in range(2)]
    seen = [torch.cat([lab for _, lab in r]) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 20


def test_tensor_batches_random_crops_and_flips_change_images():
    x, y = pattern_images(16)
    torch.manual_seed(0)
    train = TensorBatches(torch.from_numpy(x), torch.from_numpy(y).long(), 16, _spec(), CPU, 0, True,
                          scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=0.5, reprob=1.0)
    plain = TensorBatches(torch.from_numpy(x), torch.from_numpy(y).long(), 16, _spec(), CPU, 0, False)
    (a, _), (b, _) = next(iter(train)), next(iter(plain))
    assert a.shape == b.shape == (16, 3, 32, 32) and torch.isfinite(a).all()
    assert (a - b).abs().amax() > 1.0


def test_batch_random_erase_boxes_and_distribution_match_timm():
    from timm.data.random_erasing import RandomErasing

    torch.manual_seed(0)
    x = torch.ones(4000, 1, 24, 32)
    out = batch_random_erase(x.clone(), 1.0, mode="const")
    erased = out[:, 0] == 0
    rows, cols = erased.any(2), erased.any(1)
    # one axis-aligned box per image: the erased set is the product of its rows and columns
    assert torch.equal(erased, rows[:, :, None] & cols[:, None, :])
    assert (rows.sum(1) < 24).all() and (cols.sum(1) < 32).all() and (erased.sum((1, 2)) > 0).all()
    ours = erased.float().mean((1, 2))

    timm_out = RandomErasing(1.0, mode="const", device="cpu")(torch.ones(4000, 1, 24, 32))
    theirs = (timm_out[:, 0] == 0).float().mean((1, 2))
    assert abs(ours.mean() - theirs.mean()) < 0.01          # mean erased area (~0.17)
    assert abs(ours.std() - theirs.std()) < 0.01

    kept = batch_random_erase(torch.ones(4000, 3, 16, 16), 0.25, mode="pixel")
    hit = (kept != 1).flatten(1).any(1).float().mean()
    assert 0.22 < hit < 0.28
    assert torch.equal(batch_random_erase(x.clone(), 0.0), x)
    fill = batch_random_erase(torch.zeros(8, 3, 16, 16), 1.0, mode="rand")
    for image in fill:  # "rand": one colour per channel over the whole box
        box = image[0] != 0
        assert box.any() and all(image[ch][box].unique().numel() == 1 for ch in range(3))


def test_loader_resume_skips_to_the_same_augmented_samples_whatever_the_worker(tmp_path):
    """Per-sample seeds: batches after a skip equal those of a full pass, with 0 or 2 workers."""
    root = write_image_folder(tmp_path / "imgs", per_class=6)
    cfg = dict(config.DEFAULTS, input_size=32, scale=[0.3, 1.0], reprob=0.5)
    spec = DataSpec(input_size=32, crop_pct=1.0)
    ds = ImageFolderDataset(root / "train", train_transform(cfg, spec))

    def epoch_batches(workers, skip):
        batches = LoaderBatches(ds, 4, workers, True, CPU, seed=7)
        batches.set_epoch(2, skip_batches=skip)
        return [x for x, _ in batches]

    full = epoch_batches(0, 0)
    assert len(full) == 3
    for workers in (0, 2):
        resumed = epoch_batches(workers, 1)
        assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, full[1:]))


def test_unreadable_image_is_named_or_counted(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    broken = root / "train" / "circle" / "broken.png"
    broken.write_bytes(b"not a png at all")
    spec = DataSpec(input_size=32, crop_pct=1.0)
    ds = ImageFolderDataset(root / "train", eval_transform(spec))
    index = [p for p, _ in ds.samples].index(str(broken))
    with pytest.raises(BadImageError, match="broken.png.*--skip-bad-images"):
        ds[index]
    ds.skip_bad = True
    batches = LoaderBatches(ds, len(ds), 0, True, CPU, seed=0)
    (images, labels), = list(batches)
    assert batches.bad_images == 1 and len(images) == len(ds) - 1


@pytest.mark.parametrize("policy, fewest_bits", [("rand-m9-mstd0.5-inc1", 0), ("rand-m7-mstd0.5-inc1", 1)])
def test_recipe_randaugment_runs_every_op_at_both_ends_of_its_magnitudes(policy, fewest_bits):
    """The training transform with the paper's RandAugment (and m7), on the installed Pillow, over
    seeded images until every op has been drawn at both ends of its magnitude distribution (mean
    +- 2 std, the top clamped at 10): at m9 that includes PosterizeIncreasing at 10, which keeps 0
    bits and which Pillow 13 refuses."""
    cfg = dict(config.DEFAULTS, aa=policy, input_size=32)
    transform = train_transform(cfg, DataSpec(input_size=32, crop_pct=1.0))
    ops = list(augment_ops(transform))
    assert len(ops) == 15
    magnitude = float(policy.split("-m")[1].split("-")[0])
    top, bottom = min(10.0, magnitude + 1.0), magnitude - 1.0
    drawn, bits = {op.name: set() for op in ops}, set()
    for op in ops:  # record each draw (the level function sees the clamped magnitude of an applied op)
        def record(m, hparams, op=op, level_fn=op.level_fn):
            args = level_fn(m, hparams) if level_fn else ()
            drawn[op.name] |= {"top"} if m >= top else {"bottom"} if m <= bottom else set()
            if op.name == "PosterizeIncreasing":
                bits.add(args[0])
            return args
        op.level_fn = record
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)) for _ in range(16)]
    for i in range(20_000):
        random.seed(i), np.random.seed(i), torch.manual_seed(i)
        out = transform(images[i % len(images)])
        if all(len(ends) == 2 for ends in drawn.values()):
            break
    assert {name for name, ends in drawn.items() if len(ends) < 2} == set()
    assert out.shape == (3, 32, 32) and min(bits) == fewest_bits


def test_posterize_at_zero_bits_gives_the_image_earlier_pillow_gave():
    from PIL import ImageOps
    from timm.data.auto_augment import auto_augment_transform, augment_and_mix_transform
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    # Pillow before 13: a lookup table of i & ~(2 ** (8 - bits) - 1), all zeros for 0 bits
    assert np.array_equal(np.asarray(posterize(img, 0)), np.zeros((8, 8, 3), np.uint8))
    assert np.array_equal(np.asarray(posterize(img.convert("L"), 0)), np.zeros((8, 8), np.uint8))
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    # AutoAugment's Posterize keeps 0 bits below magnitude 2.5 (policy v0 has it at 2): prepared too
    from rmt.classification.augment import prepare_auto_augment
    hparams = dict(translate_const=10, img_mean=(124, 116, 104))
    for aa in (auto_augment_transform("v0", hparams), auto_augment_transform("original", hparams),
               augment_and_mix_transform("augmix-m5-w4-d2", hparams)):
        ops = list(augment_ops(prepare_auto_augment(aa)))
        assert ops and all(type(op.aug_fn).__name__ == "NamedOp" for op in ops)
        assert any(op.aug_fn.fn is posterize for op in ops)
    v0 = auto_augment_transform("v0", hparams)
    prepare_auto_augment(v0)
    zero_bits = next(op for sub in v0.policy for op in sub if op.name == "Posterize" and op.magnitude == 2)
    zero_bits.prob = 1.0
    assert not np.asarray(zero_bits(img)).any()


def _disk_gone(img, *args, **kwargs):
    raise OSError("disk gone")


def test_a_failing_transform_names_the_image_the_step_and_the_cause(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    chosen = root / "train" / "square" / "chosen.png"
    Image.new("RGB", (41, 37), (9, 9, 9)).save(chosen)
    spec = DataSpec(input_size=32, crop_pct=1.0)
    transform = eval_transform(spec)
    transform.transforms.insert(0, FailOnSize((41, 37)))
    ds = ImageFolderDataset(root / "train", transform)
    index = [p for p, _ in ds.samples].index(str(chosen))
    with pytest.raises(BadImageError, match=r"cannot augment image '.*chosen.png': FailOnSize raised ValueError: "
                                            r"this image is the chosen one; pass --skip-bad-images"):
        ds[index]
    ds.skip_bad = True
    assert ds[index] == SkippedImage(str(chosen), "cannot augment image '" + str(chosen) + "': FailOnSize raised "
                                     "ValueError: this image is the chosen one")
    batches = LoaderBatches(ds, len(ds), 0, True, CPU, seed=0)
    (images, _), = list(batches)
    assert batches.bad_images == 1 and batches.skipped.names == [str(chosen)] and len(images) == len(ds) - 1
    # an op inside RandAugment is named with its arguments
    cfg = dict(config.DEFAULTS, aa="rand-m9-n1-p1.0-mstd0", input_size=32)
    augment = train_transform(cfg, spec)
    for op in augment_ops(augment):
        op.aug_fn.fn = _disk_gone
    ds = ImageFolderDataset(root / "train", augment)
    with pytest.raises(BadImageError, match=r"RandAugment op \w+\(.*\) raised OSError: disk gone"):
        ds[0]


def test_batch_larger_than_the_set_names_the_real_image_count(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=6)
    cfg = dict(config.DEFAULTS, dataset="folder", data=str(root), batch_size=64, aug_repeats=0, input_size=32,
               workers=0, aa="none")
    data = build_data(cfg, CPU)
    assert len(data.train) == 0 and data.train_size == 12
    from rmt.classification.train import train
    with pytest.raises(ValueError, match=r"the training set \(12 images over 1 process\(es\)\) is smaller than "
                                         r"one step of 64"):
        train(dict(cfg, model_kwargs={"depths": [1, 1, 1, 1]}, device="cpu", output=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # a failed start leaves no empty run directory


def test_webdataset_shards_train_and_validate(tmp_path):
    wds = pytest.importorskip("webdataset")
    from rmt.classification.data import build_data
    from PIL import Image
    x, y = pattern_images(24, classes=2, size=36)
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"train-{shard}.tar")) as sink:
            for i in range(shard * 12, shard * 12 + 12):
                buf = io.BytesIO()
                Image.fromarray(x[i]).convert("RGB").save(buf, format="PNG")
                sink.write({"__key__": f"s{i:04d}", "png": buf.getvalue(), "cls": str(int(y[i])).encode()})
    (tmp_path / "classes.txt").write_text("top\nbottom\n")
    cfg = dict(config.DEFAULTS, dataset="wds", data=str(tmp_path / "train-{0..1}.tar"),
               val_data=str(tmp_path / "train-1.tar"), train_samples=16, batch_size=4, input_size=32,
               workers=0, aa="none")
    data = build_data(cfg, CPU)
    assert data.spec.class_names == ["top", "bottom"] and len(data.train) == 4
    batches = list(data.train)
    assert len(batches) == 4 and batches[0][0].shape == (4, 3, 32, 32)
    val = list(data.val)
    assert sum(len(lab) for _, lab in val) == 12
    assert torch.equal(torch.cat([lab for _, lab in val]), torch.from_numpy(y[12:]).long())


def test_config_precedence_round_trip_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch-size: 32\nepochs: 7\nscale: [0.5, 1.0]\nmodel_kwargs: {depths: [1, 1, 1, 1]}\n")
    cfg = config.resolve({"config": str(path), "epochs": 3}, resumed={"batch_size": 64, "lr": 0.1})
    assert (cfg["batch_size"], cfg["epochs"], cfg["lr"], cfg["scale"]) == (64, 3, 0.1, [0.5, 1.0])
    assert cfg["model_kwargs"] == {"depths": [1, 1, 1, 1]} and cfg["aa"] == "rand-m9-mstd0.5-inc1"
    saved = tmp_path / "saved.yaml"
    saved.write_text(config.to_yaml(dict(cfg, world_size=2)))
    assert config.resolve({"config": str(saved)}) == cfg
    path.write_text("batch_sise: 3\n")
    with pytest.raises(ValueError, match="unknown option 'batch_sise'"):
        config.resolve({"config": str(path)})
    with pytest.raises(ValueError, match="'epochs' must be float"):
        config.resolve({"epochs": "many"})
    with pytest.raises(ValueError, match="input-size must be at least 32"):
        config.resolve({"input_size": 28})
    with pytest.raises(ValueError, match="even --batch-size"):
        config.resolve({"batch_size": 15})
    path.write_text("epochs: [1\nbatch_size: {\n")
    with pytest.raises(ValueError, match=r"config file '.*c.yaml' is not valid YAML at line 2, column 11"):
        config.resolve({"config": str(path)})
