import gzip
import math
import os
import pickle
import re
import struct
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import data
import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = os.path.join(data.FASHION_MNIST_SYSTEM_DIR, "t10k-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test downloads anything: a missing data set behaves as on a machine without internet."""
    monkeypatch.setattr(data, "download", lambda name, root: "offline")


def exits_naming(path):
    return pytest.raises(SystemExit, match=re.escape(str(path)))


def normalise(x, mean, std):
    return (x - torch.tensor(mean).view(-1, 3, 1, 1)) / torch.tensor(std).view(-1, 3, 1, 1)


# --- loaders, on small files in the real on-disk formats ---

def write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(bytes((0, 0, 8, array.ndim)) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes())


def fake_fashionmnist(root):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    for stem, x in images.items():
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", (np.arange(len(x)) % 10).astype(np.uint8))
    return images


def test_fashionmnist_reads_idx_files_into_three_channels(tmp_path):
    images = fake_fashionmnist(tmp_path)
    for split, stem in (("train", "train"), ("pretrain", "train"), ("test", "t10k")):
        d = data.load_data("fashionmnist", split, str(tmp_path))
        assert d.images.dtype == torch.uint8 and d.images.shape == (len(images[stem]), 3, 28, 28)
        for c in range(3):  # grey repeated to 3 channels
            assert torch.equal(d.images[:, c], torch.from_numpy(images[stem]))
        assert d.labels.dtype == torch.int64 and d.labels.tolist() == [i % 10 for i in range(len(d))]
        assert (d.num_classes, d.paths, d.mean) == (10, None, (0.286,) * 3)
    assert data.default_img_size("fashionmnist") == 28


@pytest.mark.parametrize("damage", ["truncated gzip", "short data", "wrong magic", "missing labels"])
def test_fashionmnist_bad_files_exit_naming_the_file(tmp_path, damage):
    fake_fashionmnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncated gzip":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "short data":
        write_idx(path, np.zeros((12, 28, 28), np.uint8))
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "wrong magic":
        write_idx(path, np.zeros((12, 28 * 28), np.uint8))  # a 2-dimensional IDX file
    else:
        path = tmp_path / "train-labels-idx1-ubyte.gz"
        write_idx(path, np.zeros(11, np.uint8))
    with exits_naming(path):
        data.load_data("fashionmnist", "train", str(tmp_path))


def test_fashionmnist_missing_everywhere_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)  # no ./data either
    with pytest.raises(SystemExit, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        data.load_data("fashionmnist", "train")


@pytest.mark.parametrize("given", ["empty", "partial", "misspelled"])
def test_a_given_data_dir_is_used_or_refused_never_replaced(tmp_path, monkeypatch, capsys, given):
    system = tmp_path / "system"
    system.mkdir()
    fake_fashionmnist(system)  # a complete copy elsewhere must not stand in for the directory given
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", str(system))
    mine = tmp_path / "mine"
    if given != "misspelled":
        mine.mkdir()
    if given == "partial":
        fake_fashionmnist(mine)
        os.remove(mine / "t10k-labels-idx1-ubyte.gz")
    missing = "is not a directory" if given == "misspelled" else "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(SystemExit, match=f"--data-dir {re.escape(str(mine))} .*{missing}"):
        data.load_data("fashionmnist", "test", str(mine))
    assert "reading" not in capsys.readouterr().out
    if given == "partial":  # the split that is complete is read from there, and the files read are named
        data.load_data("fashionmnist", "train", str(mine))
        assert capsys.readouterr().out.strip() == (f"fashionmnist train: reading {mine}/train-images-idx3-ubyte.gz, "
                                                   f"{mine}/train-labels-idx1-ubyte.gz")


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_other_readers_refuse_a_misspelled_data_dir(tmp_path, name):
    with pytest.raises(SystemExit, match="is not a directory: correct the path"):
        data.load_data(name, "train", str(tmp_path / "misspelled"))


@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason=f"{FASHION_MNIST} is not installed")
def test_real_fashionmnist():
    d = data.load_data("fashionmnist", "test", subset="100/class")
    assert d.images.shape == (1000, 3, 28, 28) and d.labels.bincount().tolist() == [100] * 10
    assert abs(d.images.float().mean().item() / 255 - d.mean[0]) < 0.02


CIFAR = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                     "batches.meta"),
         "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta")}


def fake_cifar(root, name, per_file=3):
    folder, train_files, test_file, key, meta = CIFAR[name]
    os.makedirs(root / folder)
    rng = np.random.default_rng(1)
    rows, labels = {}, {}
    for i, f in enumerate(train_files + [test_file]):
        rows[f] = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels[f] = [(i + j * 7) % (100 if name == "cifar100" else 10) for j in range(per_file)]
        entry = {"batch_label": f, "data": rows[f], key: labels[f], "filenames": [f"{j}.png" for j in range(3)]}
        if name == "cifar100":
            entry["coarse_labels"] = [y // 5 for y in labels[f]]
        with open(root / folder / f, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    with open(root / folder / meta, "wb") as fh:
        pickle.dump({"label_names" if name == "cifar10" else "fine_label_names": ["a"] * 10}, fh, protocol=2)
    return rows, labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_python_pickles(tmp_path, name):
    rows, labels = fake_cifar(tmp_path, name)
    folder, train_files, test_file, _, _ = CIFAR[name]
    for split, files in (("train", train_files), ("test", [test_file])):
        d = data.load_data(name, split, str(tmp_path))
        assert d.images.shape == (3 * len(files), 3, 32, 32) and d.images.dtype == torch.uint8
        assert d.labels.tolist() == sum((labels[f] for f in files), [])
        row = rows[files[-1]][1]  # R plane, G plane, B plane, each row-major
        assert d.images[-2, 1, 5, 7] == row[1024 + 5 * 32 + 7] and d.images[-2, 2, 31, 0] == row[2048 + 31 * 32]
    assert d.num_classes == (100 if name == "cifar100" else 10) and data.default_img_size(name) == 32

    (tmp_path / folder / test_file).write_bytes((tmp_path / folder / test_file).read_bytes()[:500])
    with exits_naming(tmp_path / folder / test_file):
        data.load_data(name, "test", str(tmp_path))
    os.remove(tmp_path / folder / train_files[-1])
    with exits_naming(tmp_path / folder / train_files[-1]):
        data.load_data(name, "train", str(tmp_path))


class MakesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), i.e. runs code of the file's choosing."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_cifar_batches_cannot_run_code(tmp_path):
    fake_cifar(tmp_path, "cifar10")
    batch, victim = tmp_path / "cifar-10-batches-py" / "test_batch", tmp_path / "pwned"
    entry = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "payload": MakesAFile(str(victim))}
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(SystemExit) as exit_:
        data.load_data("cifar10", "test", str(tmp_path))
    assert not victim.exists()
    message = str(exit_.value)
    assert message.startswith(f"{batch} is not a readable cifar10 batch") and "it names io.open" in message
    assert message.count(". ") == 0 and message.endswith("download it again.")


def test_stl10_reads_column_major_binaries(tmp_path):
    folder = tmp_path / "stl10_binary"
    os.makedirs(folder)
    rng = np.random.default_rng(2)
    images = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for s, n in
              (("train", 4), ("test", 3), ("unlabeled", 5))}
    for split, x in images.items():  # each channel stored column-major
        (folder / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 3, 3]))  # labels 1..10
    (folder / "test_y.bin").write_bytes(bytes([2, 2, 7]))

    d = data.load_data("stl10", "train", str(tmp_path))
    assert torch.equal(d.images, torch.from_numpy(images["train"])) and d.labels.tolist() == [0, 9, 2, 2]
    d = data.load_data("stl10", "test", str(tmp_path))
    assert torch.equal(d.images, torch.from_numpy(images["test"])) and d.labels.tolist() == [1, 1, 6]
    d = data.load_data("stl10", "pretrain", str(tmp_path))  # train + unlabeled
    assert torch.equal(d.images, torch.from_numpy(np.concatenate([images["train"], images["unlabeled"]])))
    assert d.labels.tolist() == [0, 9, 2, 2] + [-1] * 5 and d.mean == data.IMAGENET_STATS[0]
    d = data.load_data("stl10", "pretrain", str(tmp_path), subset="1/class", seed=0)  # unlabeled: one more class
    assert sorted(d.labels.tolist()) == [-1, 0, 2, 9]

    (folder / "unlabeled_X.bin").write_bytes(images["unlabeled"].tobytes()[:-10])
    with exits_naming(folder / "unlabeled_X.bin"):
        data.load_data("stl10", "pretrain", str(tmp_path))
    (folder / "test_y.bin").write_bytes(bytes([2, 2]))
    with exits_naming(folder / "test_y.bin"):
        data.load_data("stl10", "test", str(tmp_path))
    os.remove(folder / "train_y.bin")
    with exits_naming(folder / "train_y.bin"):
        data.load_data("stl10", "train", str(tmp_path))


def fake_imagefolder(root):
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            os.makedirs(root / split / name)
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / split / name / "a.png")
            Image.fromarray(rng.integers(0, 256, (50, 36), dtype=np.uint8)).save(root / split / name / "b.JPG")


def test_imagefolder_reads_class_folders_lazily(tmp_path):
    fake_imagefolder(tmp_path)
    d = data.load_data("imagefolder", "train", str(tmp_path))
    assert d.images is None and d.labels.tolist() == [0, 0, 1, 1] and d.num_classes == 2
    assert [os.path.relpath(p, tmp_path) for p in d.paths] == ["train/cat/a.png", "train/cat/b.JPG",
                                                               "train/dog/a.png", "train/dog/b.JPG"]
    v1, v2, y = data.ViewDataset(d, data.view_transform("mocov2", 24, d.mean, d.std), views=2)[1]  # a grey JPEG
    assert v1.shape == v2.shape == (3, 24, 24) and not torch.equal(v1, v2) and y == 0

    test = data.load_data("imagefolder", "test", str(tmp_path))
    assert test.paths[0].endswith(os.path.join("val", "cat", "a.png"))
    x, y = next(iter(data.eval_loader(test, 24, batch_size=4)))
    expected = torch.stack([data.eval_transform(24, d.mean, d.std)(Image.open(p).convert("RGB"))
                            for p in test.paths])
    assert x.shape == (4, 3, 24, 24) and torch.equal(x, expected) and y.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_ends_a_script_with_one_sentence(tmp_path, workers):
    """In the main process or in a DataLoader worker, a broken file stops the run with the sentence naming it."""
    fake_imagefolder(tmp_path)
    broken = tmp_path / "train" / "dog" / "c.png"
    broken.write_bytes(b"not an image")
    cmd = [sys.executable, "knn_eval.py", "--arch", "mobilenetv3_small", "--random-init", "--data", "imagefolder",
           "--data-dir", str(tmp_path), "--img-size", "24", "--k", "2", "--workers", str(workers)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.fullmatch(rf"cannot read the image {re.escape(str(broken))} \(.+\): replace or delete the file\.\n",
                        proc.stderr)


def test_imagefolder_bad_data_exits_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="--data-dir"):
        data.load_data("imagefolder", "train")
    with exits_naming(tmp_path / "train"):
        data.load_data("imagefolder", "train", str(tmp_path))
    fake_imagefolder(tmp_path)
    os.makedirs(tmp_path / "val" / "emu")
    with exits_naming(tmp_path / "val"):  # val/ has a class train/ lacks
        data.load_data("imagefolder", "test", str(tmp_path))
    os.makedirs(tmp_path / "train" / "emu" / "sub")
    with exits_naming(tmp_path / "train" / "emu"):  # an empty class folder
        data.load_data("imagefolder", "train", str(tmp_path))
    os.rmdir(tmp_path / "train" / "emu" / "sub")
    os.rmdir(tmp_path / "train" / "emu")

    bad = tmp_path / "train" / "dog" / "c.jpg"
    bad.write_bytes(b"not a JPEG")
    d = data.load_data("imagefolder", "train", str(tmp_path))  # found at load, noticed when read, and the
    unreadable = lambda: pytest.raises(data.UnreadableImage, match=re.escape(str(bad)))  # scripts exit (test above)
    with unreadable():
        data.ViewDataset(d, data.view_transform("small", 16, d.mean, d.std), views=2)[d.paths.index(str(bad))]
    with unreadable():
        list(data.eval_loader(d, 16))


def test_subsets():
    full = data.load_data("synthetic", "train")
    first = data.load_data("synthetic", "train", subset="25")
    assert torch.equal(first.images, full.images[:25]) and torch.equal(first.labels, full.labels[:25])
    a = data.load_data("synthetic", "train", subset="7/class", seed=1)
    assert a.labels.bincount().tolist() == [7] * 10
    where = {image.numpy().tobytes(): i for i, image in enumerate(full.images)}  # exact: bytes, not float sums
    assert len(where) == len(full)  # every image is distinct, so the bytes name its row
    rows = [where[image.numpy().tobytes()] for image in a.images]
    assert torch.equal(full.images[rows], a.images) and rows == sorted(rows)  # kept in data-set order
    assert torch.equal(a.images, data.load_data("synthetic", "train", subset="7/class", seed=1).images)
    assert not torch.equal(a.images, data.load_data("synthetic", "train", subset="7/class", seed=2).images)
    for bad in ("0", "ten", "7/klass", "-3"):
        with pytest.raises(SystemExit, match="--subset"):
            data.load_data("synthetic", "train", subset=bad)


def test_synthetic_data_is_fixed_and_class_structured():
    train, test = data.load_data("synthetic", "train"), data.load_data("synthetic", "test")
    assert train.images.shape == (2000, 3, 32, 32) and test.images.shape == (500, 3, 32, 32)
    assert torch.equal(train.images, data.synthetic_data("train")[0]) and train.labels.bincount().tolist() == [200] * 10
    assert not torch.equal(train.images[:500], test.images)
    x = train.images.float() / 255
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(train.mean), atol=0.01)
    assert torch.allclose(x.std((0, 2, 3)), torch.tensor(train.std), atol=0.01)

    def pixels(d):
        return torch.nn.functional.normalize(d.images.flatten(1).float(), dim=1)

    nearest = (pixels(test) @ pixels(train).T).argmax(1)  # 1-NN on raw pixels
    accuracy = (train.labels[nearest] == test.labels).float().mean().item()
    assert 0.4 < accuracy < 0.9, accuracy  # chance is 0.1; good features have room to do better


def test_one_rule_picks_the_augmentation_backend_for_every_script(tmp_path):
    in_memory = data.load_data("synthetic", "train", subset="4")
    files = replace(in_memory, images=None, paths=[str(tmp_path / f"{i}.png") for i in range(4)])
    assert data.aug_backend(in_memory) == "batched" and data.aug_backend(files) == "torchvision"
    assert data.aug_backend(in_memory, "torchvision") == "torchvision"
    with pytest.raises(SystemExit, match="--aug-backend batched needs an in-memory data set"):
        data.aug_backend(files, "batched")
    assert pretrain.get_args([]).aug_backend == "auto"  # pretrain.py's default is the rule's, as view_batches'


def test_unknown_names_exit():
    with pytest.raises(SystemExit, match="fashionmnist"):
        data.load_data("mnist", "train")
    with pytest.raises(SystemExit, match="imagefolder"):
        data.default_img_size("mnist")
    with pytest.raises(SystemExit, match="mocov2"):
        data.BatchedAugment("heavy", 32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(SystemExit, match="mocov2"):
        data.view_transform("heavy", 32, (0.5,) * 3, (0.5,) * 3)


# --- the two augmentation backends draw from one distribution ---

@pytest.mark.parametrize("aug", ["mocov2", "strong", "small", "linear"])
def test_view_transform_is_the_preset(aug):
    a = data.AUGMENTATIONS[aug]
    steps = data.view_transform(aug, 224, (0.5,) * 3, (0.5,) * 3).transforms
    crop = steps[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == a.scale and crop.ratio == data.RATIO
    assert crop.size == (224, 224) and crop.interpolation == T.InterpolationMode.BILINEAR
    found = {}
    for step in steps[1:]:
        inner = step.transforms[0] if isinstance(step, T.RandomApply) else step
        found[type(inner).__name__] = (getattr(step, "p", None), inner)
    if a.jitter:
        p, jitter = found.pop("ColorJitter")
        b, c, s, h = a.jitter
        assert p == a.p_jitter and (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
            (1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h))
    if a.p_grey:
        assert found.pop("RandomGrayscale")[0] == a.p_grey
    if a.p_blur:
        p, blur = found.pop("GaussianBlur")
        assert p == a.p_blur and blur.sigma == data.BLUR_SIGMA and blur.kernel_size == (23, 23)
    assert found.pop("RandomHorizontalFlip")[0] == 0.5
    assert set(found) == {"ToTensor", "Normalize"}


def ks_distance(a, b):
    """The largest gap between the empirical distribution functions of samples a and b."""
    at = torch.cat([a, b]).unique()
    cdf = [torch.searchsorted(x.sort().values, at, right=True) / len(x) for x in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


def torchvision_boxes(n, height, width, scale):
    torch.manual_seed(0)
    img = torch.empty(3, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(img, scale, data.RATIO) for _ in range(n)]).float()


@pytest.mark.parametrize("aug, height, width", [("mocov2", 32, 32), ("linear", 28, 28), ("small", 16, 64)])
def test_crop_boxes_match_random_resized_crop(aug, height, width):
    """(16, 64) is wider than any allowed aspect ratio: many draws fall back to torchvision's centre crop."""
    n, scale = 4000, data.AUGMENTATIONS[aug].scale
    ours = data.BatchedAugment(aug, 32, (0.5,) * 3, (0.5,) * 3).sample_params(
        n, height, width, torch.Generator().manual_seed(0))["box"].float()
    theirs = torchvision_boxes(n, height, width, scale)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    for stat in (lambda b: b[:, 2] * b[:, 3] / (height * width),  # area fraction
                 lambda b: torch.log(b[:, 3] / b[:, 2]),  # log aspect ratio
                 lambda b: b[:, 0] / (height - b[:, 2]).clamp(min=1),  # where the box sits
                 lambda b: b[:, 1] / (width - b[:, 3]).clamp(min=1)):
        a, b = stat(ours), stat(theirs)
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / n) + 1e-6
        assert ks_distance(a, b) < 1.95 * math.sqrt(2 / n)  # two-sample Kolmogorov-Smirnov test at 0.1%
    area = ours[:, 2] * ours[:, 3] / (height * width)
    assert area.max() <= 1
    if height == width:  # every draw fits: area inside the scale range up to rounding to whole pixels
        assert area.min() > scale[0] * 0.8 and torch.log(ours[:, 3] / ours[:, 2]).abs().max() < 0.4
    else:  # too wide for any allowed ratio: when no try fits, torchvision takes the full height, centred
        w = round(height * data.RATIO[1])
        centre = torch.tensor([0.0, (width - w) // 2, height, w])
        fallback = [(boxes == centre).all(1).float().mean() for boxes in (ours, theirs)]
        assert fallback[1] > 0.2 and abs(fallback[0] - fallback[1]) < 0.04


@pytest.mark.parametrize("aug", ["mocov2", "strong", "small"])
def test_random_parameters_have_the_preset_ranges_and_probabilities(aug):
    n, a = 20000, data.AUGMENTATIONS[aug]
    p = data.BatchedAugment(aug, 32, (0.5,) * 3, (0.5,) * 3).sample_params(
        n, 32, 32, torch.Generator().manual_seed(0))
    for coin, prob in (("flip", 0.5), ("jitter", a.p_jitter), ("grey", a.p_grey), ("blur", a.p_blur)):
        assert abs(p[coin].float().mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n) + 1e-9, coin
    jitter = T.ColorJitter(*a.jitter)  # its factor ranges, each drawn uniformly
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, data.BLUR_SIGMA)
    for ours, (low, high) in zip([*p["factors"].T, p["sigma"]], ranges):
        assert low <= ours.min() < low + 0.001 * (high - low) and high - 0.001 * (high - low) < ours.max() <= high
        assert abs(ours.mean() - (low + high) / 2) < 4 * (high - low) / math.sqrt(12 * n)
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # a permutation of the four ops per image
    slot_counts = torch.stack([(p["order"] == op).float().mean(0) for op in range(4)])
    assert (slot_counts - 0.25).abs().max() < 0.02  # every op equally likely in every slot


def colourful_image():
    t = torch.linspace(0, 1, 32)
    x = torch.stack([t.view(1, -1).expand(32, 32), t.view(-1, 1).expand(32, 32), 1 - (t.view(-1, 1) * t) ** 0.5])
    return (x * 255).round().to(torch.uint8)


def test_both_backends_give_alike_views_of_one_image():
    """Pixel statistics of 1500 views of one image, per backend: brightness of the view, its colour spread,
    the fraction of grey views and the left-right balance (flips)."""
    n, mean, std = 1500, (0.5,) * 3, (0.25,) * 3
    img = colourful_image()
    torch.manual_seed(0)
    transform = data.view_transform("strong", 32, mean, std)
    pil = TF.to_pil_image(img)
    theirs = torch.stack([transform(pil) for _ in range(n)])
    ours = data.BatchedAugment("strong", 32, mean, std)(img.expand(n, 3, 32, 32), torch.Generator().manual_seed(0))
    stats = []
    for views in (ours, theirs):
        x = views * 0.25 + 0.5
        spread = (x.amax(1) - x.amin(1)).flatten(1).amax(1)
        stats.append(torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), (spread < 2 / 255).float(),
                                  x[..., :16].mean((1, 2, 3)) - x[..., 16:].mean((1, 2, 3))], 1))
    diff = (stats[0].mean(0) - stats[1].mean(0)).abs()
    tolerance = 4 * ((stats[0].var(0) + stats[1].var(0)) / n).sqrt() + 0.005  # + uint8 rounding in PIL's ops
    assert (diff < tolerance).all(), (diff, tolerance)


def identity_params(n, size):
    return {"box": torch.tensor([[0, 0, size, size]] * n), "flip": torch.zeros(n, dtype=torch.bool),
            "jitter": torch.zeros(n, dtype=torch.bool), "order": torch.arange(4).repeat(n, 1),
            "factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n), "grey": torch.zeros(n, dtype=torch.bool),
            "blur": torch.zeros(n, dtype=torch.bool), "sigma": torch.ones(n)}


def test_batched_ops_match_torchvision_functional():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    images = data.synthetic_data("test", 6)[0]
    images[0, :, :4] = 128  # grey pixels: no hue
    x = images.float() / 255
    aug = data.BatchedAugment("mocov2", 32, mean, std)
    assert torch.equal(aug.apply(images, identity_params(6, 32)), normalise(x, mean, std))

    p = identity_params(6, 32)
    p["box"][:, :] = torch.tensor([3, 5, 20, 14])  # upsampled crops, every other one mirrored
    p["flip"][::2] = True
    crops = TF.resized_crop(x, 3, 5, 20, 14, [32, 32], antialias=False)
    crops[::2] = TF.hflip(crops[::2])
    assert torch.allclose(aug.apply(images, p), normalise(crops, mean, std), atol=1e-5)
    p = identity_params(6, 32)
    p["box"][:, :] = torch.tensor([0, 0, 32, 32])
    assert torch.allclose(data.BatchedAugment("small", 20, mean, std).apply(images, p),
                          normalise(TF.resize(x, [20, 20], antialias=False), mean, std), atol=5e-5)

    factors = torch.tensor([[0.6, 1.3, 0.7, 0.1], [1.4, 0.6, 1.4, -0.1], [1.0, 1.8, 0.2, 0.4],
                            [0.2, 0.5, 1.7, -0.4], [1.2, 1.0, 0.0, 0.25], [0.7, 0.9, 1.1, -0.05]])
    orders = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    functional = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    p = identity_params(6, 32)
    p.update(jitter=torch.ones(6, dtype=torch.bool), order=orders, factors=factors)
    expected = x.clone()
    for i in range(6):
        for op in orders[i].tolist():
            expected[i] = functional[op](expected[i], factors[i, op].item())
    assert torch.allclose(aug.apply(images, p), normalise(expected, mean, std), atol=1e-3)  # 0.299 vs 0.2989 grey

    p = identity_params(6, 32)
    p.update(grey=torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), blur=torch.tensor([1, 1, 0, 0, 1, 1]) > 0,
             sigma=torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.8]))
    expected = x.clone()
    for i in range(6):
        if p["grey"][i]:
            expected[i] = TF.rgb_to_grayscale(expected[i], 3)
        if p["blur"][i]:
            expected[i] = TF.gaussian_blur(expected[i], [3, 3], [p["sigma"][i].item()] * 2)
    assert torch.allclose(aug.apply(images, p), normalise(expected, mean, std), atol=1e-3)
    assert data.blur_kernel_size(224) == 23 and data.blur_kernel_size(96) == 9 and data.blur_kernel_size(28) == 3


def test_views_are_per_image_and_deterministic_for_a_seed():
    images = data.synthetic_data("train", 8)[0][:1].expand(8, 3, 32, 32)  # one image, eight times
    aug = data.BatchedAugment("mocov2", 32, (0.5,) * 3, (0.5,) * 3)
    g = torch.Generator().manual_seed(0)
    v1, v2 = aug(images, g), aug(images, g)
    assert v1.shape == (8, 3, 32, 32) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)
    distinct = torch.cdist(v1.flatten(1), v1.flatten(1)) + torch.eye(8)
    assert (distinct > 0).all()  # every image in the batch has its own parameters
    assert torch.equal(v1, aug(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(v1, aug(images, torch.Generator().manual_seed(1)))
    assert data.BatchedAugment("linear", 24, (0.5,) * 3, (0.5,) * 3)(images, g).shape == (8, 3, 24, 24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batched_augment_on_cuda():
    images = data.synthetic_data("train", 64)[0].cuda()
    aug = data.BatchedAugment("mocov2", 32, (0.5,) * 3, (0.5,) * 3)
    v = aug(images, torch.Generator(device="cuda").manual_seed(0))
    assert v.is_cuda and torch.equal(v, aug(images, torch.Generator(device="cuda").manual_seed(0)))
    cpu = aug.apply(images.cpu(), aug.sample_params(64, 32, 32, torch.Generator().manual_seed(0)))
    gpu = aug(images, torch.Generator().manual_seed(0))  # CPU generator, CUDA images
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# --- datasets for the torchvision backend, and evaluation ---

def test_two_view_dataset_in_memory():
    d = data.load_data("synthetic", "train", subset="8")
    loader = torch.utils.data.DataLoader(data.ViewDataset(d, data.view_transform("small", 32, d.mean, d.std), views=2),
                                         batch_size=4)
    v1, v2, y = next(iter(loader))
    assert v1.shape == v2.shape == (4, 3, 32, 32) and not torch.equal(v1, v2) and torch.equal(y, d.labels[:4])


def test_eval_loader_in_memory():
    d = data.load_data("synthetic", "test", subset="10")
    loader = data.eval_loader(d, 32, batch_size=4)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(x, normalise(d.images.float() / 255, d.mean, d.std))  # native size: only normalised
    assert torch.equal(torch.cat([y for _, y in loader]), d.labels)  # fixed order, iterable again
    x, _ = next(iter(data.eval_loader(d, 24, batch_size=4)))
    resized = TF.resize(d.images[:4].float() / 255, [24, 24], antialias=True)
    assert torch.allclose(x, normalise(resized, d.mean, d.std), atol=1e-5)
