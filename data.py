"""Data sets, two-view augmentations and the evaluation transform.

Every data set loads into an ImageData: uint8 images in memory (Fashion-MNIST, CIFAR, STL-10, synthetic) or image
file paths (imagefolder). Two augmentation backends draw views from one distribution:
- view_transform: torchvision's per-image transforms on PIL images, run in DataLoader workers (the canonical path);
- BatchedAugment: the same transforms with per-sample random parameters, applied to whole uint8 batches on their
  device, so in-memory data sets need no DataLoader workers at all.
"""
import argparse
import codecs
import gzip
import math
import os
import pickle
import re
import shlex
import shutil
import struct
import sys
import zlib
from collections import namedtuple
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DATASETS = ("fashionmnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic")
AUGS = ("mocov2", "strong", "small")  # the pretraining augmentations; the aug functions also accept "linear"

# Every augmentation also flips horizontally with p 0.5 and crops with aspect ratios in RATIO. Colour jitter
# (b, c, s, h) draws brightness, contrast and saturation factors in [1 - b, 1 + b] etc. and a hue shift in [-h, h],
# applying the four ops in a random order (torchvision's ColorJitter); then greyscale, then Gaussian blur with sigma in
# BLUR_SIGMA.
Aug = namedtuple("Aug", "scale jitter p_jitter p_grey p_blur")
AUGMENTATIONS = {
    #             crop scale     jitter (b, c, s, h)     p_jitter p_grey p_blur
    "mocov2": Aug((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5),
    "strong": Aug((0.2, 1.0), (0.8, 0.8, 0.8, 0.4), 0.8, 0.5, 0.5),  # AAAI'22 small-model recipe
    "small": Aug((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.0),  # 28-64 px images: no blur
    "linear": Aug((0.08, 1.0), None, 0.0, 0.0, 0.0),  # linear evaluation's training crops: crop + flip only
}
RATIO = (3 / 4, 4 / 3)
BLUR_SIGMA = (0.1, 2.0)
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STATS = {  # per-channel mean and std of the training images in [0, 1]
    "fashionmnist": ((0.286,) * 3, (0.353,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": IMAGENET_STATS,
    "imagefolder": IMAGENET_STATS,
    "synthetic": ((0.494, 0.542, 0.495), (0.273, 0.280, 0.265)),
}
IMG_SIZES = {"fashionmnist": 28, "cifar10": 32, "cifar100": 32, "synthetic": 32, "stl10": 96, "imagefolder": 224}
DEFAULT_DATA_DIR = "data"  # where downloads go when --data-dir is not given
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# The ImageNet stem has a total stride of 32: at 16 px its last stage already works on 1x1 maps (resnet18:
# 16 -> 8 -> 4 -> 2 -> 1 -> 1), and below that ever more of the network sees only padding.
MIN_IMG_SIZE = 16
PROJECT = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


# --- command-line flags, shared by the scripts ---

def interpreter():
    """How to start the Python that is running, in a command this project prints: its path relative to the working
    directory when it lies below it (the project's .venv/bin/python), "python3" when that is the one on the PATH,
    else its full path. Never a bare python3 that may lack torch."""
    here = os.path.relpath(sys.executable)
    if not here.startswith(os.pardir):
        return here
    on_path = shutil.which("python3")
    if on_path and os.path.dirname(os.path.abspath(on_path)) == os.path.dirname(os.path.abspath(sys.executable)):
        return "python3"
    return sys.executable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps a script's docstring as written, its example commands started by the interpreter that is running
    (interpreter()), and shows every flag's default."""

    def _fill_text(self, text, width, indent):
        return super()._fill_text(text.replace("python3 ", interpreter() + " "), width, indent)


class FlagParser(argparse.ArgumentParser):
    """The scripts' parser: --help as HelpFormatter shows it; @FILE arguments read as flag files (shell words, # starts
    a comment, an @FILE inside one read in its place, relative to the repository: the presets and recipes); and the
    flags it defines kept in order (self.flags), so that command_line can write a command out resolved."""

    def __init__(self, description):
        self.flags = []  # before argparse's own __init__, which adds --help
        super().__init__(description=description, formatter_class=HelpFormatter, fromfile_prefix_chars="@")

    def convert_arg_line_to_args(self, line):
        words = shlex.split(line, comments=True)
        return [f"@{os.path.join(PROJECT, w[1:])}" if w.startswith("@") else w for w in words]

    def add_argument(self, *args, **kwargs):
        return self.kept(super().add_argument(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        group = super().add_mutually_exclusive_group(**kwargs)
        add = group.add_argument
        group.add_argument = lambda *args, **kw: self.kept(add(*args, **kw))
        return group

    def kept(self, action):
        if action.option_strings:
            self.flags.append(action)
        return action


def given_flags(parser, argv=None):
    """The destinations of the flags on the command line: argparse fills in a default only where the namespace lacks
    the attribute, so parsing into one whose every attribute is a marker leaves the marker exactly where no flag was
    given."""
    unset = object()
    parsed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args(argv)), unset)))
    return {key for key, value in vars(parsed).items() if value is not unset}


def command_line(parser, argv):
    """The flags argv gives, as `parser` (a FlagParser) reads them (@FILEs read, a flag given twice taken where it was
    given last), written out once each in the parser's order: the command resolved."""
    args, given = parser.parse_args(argv), given_flags(parser, argv)
    words = []
    for action in parser.flags:
        if action.dest not in given:
            continue
        value = getattr(args, action.dest)
        if action.nargs == 0:  # store_true and its kind
            words += [action.option_strings[0]] if value == action.const else []
        else:
            words += [action.option_strings[0], *map(flag_text, value if isinstance(value, list) else [value])]
    return words


def flag_text(value):
    """A flag's value as a command line gives it: a whole float without its '.0' (--warmup-epochs 5), any other as
    Python writes it (exact: it reads back as the same number)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def int_flag(low, high):
    """An argparse type: an integer in [low, high]. Anything else ends with argparse's usage error naming the flag."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not an integer in {low}..{high}")
        return value
    return parse


def float_flag(low, high, low_open=False, high_open=False):
    """An argparse type: a finite number in [low, high], an end excluded where *_open."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"{text} is not a number in {'(' if low_open else '['}{low:g}, {high:g}"
                                             f"{')' if high_open else ']'}")
        return value
    return parse


def img_size_flag(text):
    """An argparse type for --img-size: 0 (the data set's native size) or MIN_IMG_SIZE..4096 px."""
    value = int_flag(0, 4096)(text)
    if 0 < value < MIN_IMG_SIZE:
        raise argparse.ArgumentTypeError(f"{value} px is below the {MIN_IMG_SIZE} px the networks need (0 = the "
                                         f"data set's native size)")
    return value


@dataclass
class ImageData:
    name: str
    images: torch.Tensor | None  # uint8 [N, 3, H, W] for in-memory sets (grey repeated to 3 channels)
    paths: list[str] | None  # image files for imagefolder
    labels: torch.Tensor  # int64 [N]; -1 for unlabeled images (STL-10's unlabeled split)
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __len__(self):
        return len(self.labels)


def default_img_size(name):
    if name not in IMG_SIZES:
        raise SystemExit(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}.")
    return IMG_SIZES[name]


def load_data(name, split, data_dir=None, subset=None, seed=0):
    """split: "pretrain" (STL-10: train + unlabeled; other sets: train), "train" or "test" (imagefolder: val/).
    subset: None, "N" (the first N images) or "N/class" (N images per class, drawn with seed)."""
    if name not in DATASETS:
        raise SystemExit(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}.")
    assert split in ("pretrain", "train", "test"), split
    images, paths = None, None
    if name == "fashionmnist":
        images, labels = read_fashionmnist(data_dir, split)
    elif name in ("cifar10", "cifar100"):
        images, labels = read_cifar(name, data_dir, split)
    elif name == "stl10":
        images, labels = read_stl10(data_dir, split)
    elif name == "imagefolder":
        paths, labels, num_classes = read_imagefolder(data_dir, split)
    else:
        images, labels = synthetic_data(split)
    if name != "imagefolder":
        num_classes = 100 if name == "cifar100" else 10
    data = ImageData(name, images, paths, labels, num_classes, *STATS[name])
    return take_subset(data, subset, seed) if subset else data


def subset_spec(subset):
    """(N, per class?) of a --subset value, "N" or "N/class"."""
    match = re.fullmatch(r"(\d+)(/class)?", str(subset))
    if not match or int(match[1]) == 0:
        raise SystemExit(f"--subset {subset!r} is neither N nor N/class with N > 0: use e.g. 1000 or 100/class.")
    return int(match[1]), match[2] is not None


def subset_size(subset, total, num_classes):
    """The images a --subset keeps of `total` images in `num_classes` classes (at most: a smaller class gives
    fewer); all `total` without one."""
    if not subset:
        return total
    n, per_class = subset_spec(subset)
    return min(total, n * num_classes if per_class else n)


def take_subset(data, subset, seed):
    """"N": the first N images; "N/class": N images per class (all of a smaller class), drawn with seed and kept in
    data-set order. Unlabeled images (label -1) count as one class."""
    n, per_class = subset_spec(subset)
    if not per_class:
        keep = torch.arange(min(n, len(data)))
        short = n > len(data)
    else:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        chosen = [order[data.labels[order] == c][:n] for c in data.labels.unique()]
        keep = torch.cat(chosen).sort().values
        short = any(len(c) < n for c in chosen)
    if short:  # said, not silently cut: the image count used is what every results file records
        print(f"--subset {subset}: {data.name} has fewer images than that, so {len(keep)} are used.", file=sys.stderr)
    return replace(data, labels=data.labels[keep],
                   images=None if data.images is None else data.images[keep],
                   paths=None if data.paths is None else [data.paths[i] for i in keep.tolist()])


def download(name, root):
    """Fetch a data set into root in torchvision's on-disk format; the error as a string when that fails."""
    import torchvision  # here, not at the top: importing torchvision takes 3 s, which in-memory stages never need
    dataset = {"fashionmnist": torchvision.datasets.FashionMNIST, "cifar10": torchvision.datasets.CIFAR10,
               "cifar100": torchvision.datasets.CIFAR100, "stl10": torchvision.datasets.STL10}[name]
    try:
        dataset(root, download=True)
    except Exception as e:  # offline, refused, or a broken archive: whatever the reason, the user acts the same
        return str(e) or type(e).__name__
    return None


def given_dir(data_dir):
    """--data-dir, None when not given. A given directory is used or refused, never replaced by another one; one that
    does not exist is taken for a typo rather than created by a download."""
    if data_dir and not os.path.isdir(data_dir):
        raise SystemExit(f"--data-dir {data_dir} is not a directory: correct the path, or create the directory to "
                         f"download the data set into it.")
    return data_dir


def read_idx(path, ndim):
    """A gzip-compressed IDX file of unsigned bytes: magic 0x0000080<ndim>, ndim big-endian int32 sizes, the data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise SystemExit(f"{path} is not a complete gzip file ({e}): download it again.")
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 8, ndim)):
        raise SystemExit(f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes: download it again.")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    if len(raw) != header + math.prod(dims):
        raise SystemExit(f"{path} holds {len(raw) - header} data bytes where its header promises "
                         f"{math.prod(dims)} ({' x '.join(map(str, dims))}): the file is truncated or corrupt; "
                         f"download it again.")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def read_fashionmnist(data_dir, split):
    """The IDX files of this split from data_dir (or its FashionMNIST/raw/, where torchvision downloads them),
    downloaded into data_dir when missing; without data_dir, from Debian's copy or ./data."""
    stem = "t10k" if split == "test" else "train"
    files = (f"{stem}-images-idx3-ubyte.gz", f"{stem}-labels-idx1-ubyte.gz")
    root = given_dir(data_dir) or DEFAULT_DATA_DIR
    downloaded = os.path.join(root, "FashionMNIST", "raw")  # torchvision's layout
    places = ([] if data_dir else [FASHION_MNIST_SYSTEM_DIR]) + [root, downloaded]
    found = next((d for d in places if all(os.path.exists(os.path.join(d, f)) for f in files)), None)
    if found is None:
        error = download("fashionmnist", root)
        if error and data_dir:
            missing = [f for f in files if not os.path.exists(os.path.join(root, f))]
            raise SystemExit(f"--data-dir {data_dir} lacks {' and '.join(missing)} (nor has FashionMNIST/raw/ with "
                             f"them) and downloading them there failed ({error}): copy Fashion-MNIST's IDX .gz files "
                             f"into it, or leave out --data-dir to read Debian's copy.")
        if error:
            raise SystemExit(f"Fashion-MNIST's IDX files are in none of {', '.join(places)} and could not be "
                             f"downloaded ({error}): install them with "
                             f"`apt-get install dataset-fashion-mnist`, or pass --data-dir DIR holding the four "
                             f"IDX .gz files.")
        found = downloaded
    paths = [os.path.join(found, f) for f in files]
    print(f"fashionmnist {split}: reading {', '.join(paths)}")
    images = read_idx(paths[0], 3)
    labels = read_idx(paths[1], 1)
    if len(images) != len(labels) or labels.max(initial=0) > 9:
        raise SystemExit(f"{paths[1]} does not hold one label in 0..9 for each of the "
                         f"{len(images)} images of {files[0]}: download both files again.")
    return torch.from_numpy(images).unsqueeze(1).repeat(1, 3, 1, 1), torch.from_numpy(labels).long()


class BatchUnpickler(pickle.Unpickler):
    """CIFAR's batches hold only dicts, lists, strings, ints and numpy arrays. Any other global a pickle names (a
    crafted file's way to run code while it is read) is refused; arrays need their reconstructor, ndarray and dtype,
    and Python 3's protocol-2 pickles spell bytes as _codecs.encode(text, "latin1")."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],  # numpy 1 pickles
               ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],  # numpy 2 pickles
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never does")
        return self.ALLOWED[module, name]


def read_cifar(name, data_dir, split):
    """CIFAR's python version: pickled dicts with "data" (N x 3072 uint8, the R, G and B planes row-major) and
    "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)."""
    folder, train_files, test_files, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels")}[name]
    root = given_dir(data_dir) or DEFAULT_DATA_DIR
    paths = [os.path.join(root, folder, f) for f in (test_files if split == "test" else train_files)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        error = download(name, root)
        if error:
            raise SystemExit(f"{missing[0]} does not exist and {name} could not be downloaded ({error}): pass "
                             f"--data-dir DIR holding {folder}/ from the python version of {name}.")
    print(f"{name} {split}: reading {', '.join(paths)}")
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                entry = BatchUnpickler(f, encoding="latin1").load()
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(entry[key], dtype=np.int64)
        except Exception as e:  # a truncated pickle, another file under this name, ...: the same fix
            raise SystemExit(f"{path} is not a readable {name} batch ({type(e).__name__}: {e}): download it again.")
        if len(x) != len(y) or y.min(initial=0) < 0 or y.max(initial=0) >= (100 if name == "cifar100" else 10):
            raise SystemExit(f"{path} does not hold one valid label for each of its {len(x)} images: download it "
                             f"again.")
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def read_stl10(data_dir, split):
    """STL-10's binary version: *_X.bin holds 3 x 96 x 96 uint8 per image, each channel column-major; *_y.bin one
    byte per image, labels 1..10."""
    folder = os.path.join(given_dir(data_dir) or DEFAULT_DATA_DIR, "stl10_binary")
    parts = {"pretrain": [("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)],
             "train": [("train_X.bin", "train_y.bin")], "test": [("test_X.bin", "test_y.bin")]}[split]
    files = [os.path.join(folder, f) for part in parts for f in part if f]
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
        error = download("stl10", data_dir or DEFAULT_DATA_DIR)
        if error:
            raise SystemExit(f"{missing[0]} does not exist and STL-10 could not be downloaded ({error}): pass "
                             f"--data-dir DIR holding stl10_binary/ from STL-10's binary version.")
    print(f"stl10 {split}: reading {', '.join(files)}")
    images, labels = [], []
    for x_file, y_file in parts:
        path = os.path.join(folder, x_file)
        x = np.fromfile(path, np.uint8)
        if x.size == 0 or x.size % (3 * 96 * 96):
            raise SystemExit(f"{path} holds {x.size} bytes, not a whole number of 3 x 96 x 96 images: the file is "
                             f"truncated or corrupt; download it again.")
        images.append(x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
        if y_file is None:
            labels.append(np.full(len(images[-1]), -1, np.int64))
            continue
        path = os.path.join(folder, y_file)
        y = np.fromfile(path, np.uint8).astype(np.int64) - 1
        if len(y) != len(images[-1]) or y.min(initial=0) < 0 or y.max(initial=0) > 9:
            raise SystemExit(f"{path} does not hold one label in 1..10 for each of the {len(images[-1])} images "
                             f"of {x_file}: download STL-10 again.")
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def class_folders(root):
    if not os.path.isdir(root):
        raise SystemExit(f"{root} does not exist: --data-dir must hold train/ and val/, each with one folder of "
                         f"images per class.")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise SystemExit(f"{root} holds no class folders: put each class's images in a folder of its own.")
    return classes


def read_imagefolder(data_dir, split):
    """train/<class>/... and val/<class>/... (any depth below the class folder); labels number the class folders
    of train/ in sorted order, and val/ must have the same ones. Images are decoded only when read."""
    if data_dir is None:
        raise SystemExit("--data imagefolder needs --data-dir DIR holding train/ and val/ class folders.")
    classes = class_folders(os.path.join(data_dir, "train"))
    root = os.path.join(data_dir, "val" if split == "test" else "train")
    if split == "test" and class_folders(root) != classes:
        raise SystemExit(f"the class folders of {root} differ from those of {os.path.join(data_dir, 'train')}: "
                         f"give both the same classes.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder, followlinks=True) for f in fs
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise SystemExit(f"the class folder {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)}): add its "
                             f"images or remove the folder.")
        paths += files
        labels += [label] * len(files)
    return paths, torch.tensor(labels), len(classes)


def synthetic_data(split, n=None, num_classes=10, size=32):
    """A class-structured stand-in data set, the same on every call: each class is a two-colour grating (its own
    orientation, frequency and colours); an image is its class's grating at a random phase, overlaid with a fainter
    grating of a random class, at a random brightness, plus pixel noise. A kNN on raw pixels is far above chance
    but far from perfect (10 classes: 1-NN 65%, weighted 20-NN 56%), so features invariant to the phase have room
    to do better. n defaults to 2000 (train, pretrain) or 500 (test)."""
    g = torch.Generator().manual_seed(0)
    orientation = math.pi * torch.rand(num_classes, generator=g)
    frequency = 1 + 3 * torch.rand(num_classes, generator=g)  # cycles per image, so any size looks alike
    colours = torch.rand(num_classes, 2, 3, generator=g)
    n = n or (500 if split == "test" else 2000)
    g = torch.Generator().manual_seed(2 if split == "test" else 1)
    labels = torch.randperm(n, generator=g) % num_classes
    t = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(t, t, indexing="ij")

    def grating(c):
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
        along = x * orientation[c].cos().view(-1, 1, 1) + y * orientation[c].sin().view(-1, 1, 1)
        p = (0.5 + 0.5 * torch.sin(2 * math.pi * frequency[c].view(-1, 1, 1) * along + phase)).unsqueeze(1)
        return p * colours[c, 0, :, None, None] + (1 - p) * colours[c, 1, :, None, None]

    img = 0.6 * grating(labels) + 0.4 * grating(torch.randint(num_classes, (n,), generator=g))
    img = img * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.2 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


# --- torchvision backend: per-image transforms on PIL images ---

def augmentation(aug):
    if aug not in AUGMENTATIONS:
        raise SystemExit(f"unknown augmentation {aug!r}: choose one of {', '.join(AUGMENTATIONS)}.")
    return AUGMENTATIONS[aug]


def blur_kernel_size(img_size):
    """MoCo-v2's kernel covers about 10% of the image (23 px at 224), odd; at least 3."""
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


def view_transform(aug, img_size, mean, std):
    """One random view: PIL image -> normalised float tensor [3, img_size, img_size]."""
    from torchvision import transforms as T  # imported where used, as in download()
    a = augmentation(aug)
    steps = [T.RandomResizedCrop(img_size, scale=a.scale, ratio=RATIO)]
    if a.jitter:
        steps.append(T.RandomApply([T.ColorJitter(*a.jitter)], p=a.p_jitter))
    if a.p_grey:
        steps.append(T.RandomGrayscale(p=a.p_grey))
    if a.p_blur:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(img_size), sigma=BLUR_SIGMA)], p=a.p_blur))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(img_size, mean, std):
    """Image files (imagefolder): ImageNet's protocol, resize to img_size / 0.875 and keep the centre."""
    from torchvision import transforms as T  # imported where used, as in download()
    return T.Compose([T.Resize(round(img_size / 0.875)), T.CenterCrop(img_size), T.ToTensor(),
                      T.Normalize(mean, std)])


class UnreadableImage(ValueError):
    """An image file PIL cannot read. An Exception, not SystemExit: a DataLoader worker hands Exceptions to the main
    process (SystemExit would only kill the worker), and exit_on_unreadable_image turns it into one sentence there."""


def pil_image(data, i):
    if data.images is not None:
        return Image.fromarray(data.images[i].permute(1, 2, 0).cpu().numpy())
    path = data.paths[i]
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"cannot read the image {path} ({e}): replace or delete the file.") from None


def exit_on_unreadable_image(main):
    """Run a script's main(); an unreadable image, in this process or in a DataLoader worker (whose error arrives
    with the worker's traceback in its message), ends the run with the one sentence that names the file."""
    try:
        main()
    except UnreadableImage as e:
        raise SystemExit(str(e).strip().splitlines()[-1].split("UnreadableImage: ", 1)[-1]) from None


class ViewDataset(torch.utils.data.Dataset):
    """(view, ..., label): `views` independent draws of `transform` on one image; one view for evaluation
    (eval_transform) or linear evaluation's training crops, two for pretraining."""

    def __init__(self, data, transform, views=1):
        self.data, self.transform, self.views = data, transform, views

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = pil_image(self.data, i)
        return (*(self.transform(img) for _ in range(self.views)), self.data.labels[i])


# --- batched backend: the same distribution, per-sample parameters, whole batches on their device ---

def grey(x):
    """[B, 3, H, W] in [0, 1] -> luma [B, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def blend(x, y, factor):
    """factor * x + (1 - factor) * y, clipped to [0, 1], one factor per image."""
    return torch.lerp(y, x, factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_brightness(x, factor):  # a blend with black
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x, factor):  # a blend with the image's mean grey level
    return blend(x, grey(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):  # a blend with the grey image
    return blend(x, grey(x), factor)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` turns, keeping HSV's value and saturation (so the channels' max and min)."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    chroma = high - low
    # hue in sixths of a turn (0 red, 2 green, 4 blue), read off the brightest channel
    h6 = torch.where(high == r, g - b, torch.where(high == g, b - r + 2 * chroma, r - g + 4 * chroma))
    h6 = torch.remainder(h6 / torch.where(chroma > 0, chroma, 1) + 6 * shift.view(-1, 1, 1), 6)
    # the fully saturated colour of hue h6: each channel a trapezoid in h6
    pure = torch.stack([(h6 - 3).abs() - 1, 2 - (h6 - 2).abs(), 2 - (h6 - 4).abs()], 1).clamp(0, 1)
    return low.unsqueeze(1) + chroma.unsqueeze(1) * pure


BLENDS = (adjust_brightness, adjust_contrast, adjust_saturation)  # ops 0, 1, 2 in torchvision's numbering; 3 is hue


def blend_slot(x, ops, factors, take):
    """Where `take`, image i applies blend ops[i] by its factor; elsewhere the factor is 1, which leaves x, already
    in [0, 1], as it is."""
    for op, adjust in enumerate(BLENDS):
        x = adjust(x, torch.where(take & (ops == op), factors[:, op], 1))
    return x


def color_jitter(x, jittered, order, factors):
    """torchvision's ColorJitter on a batch: each jittered image applies the four ops in its own order [B, 4] with
    its factors [B, 4] (brightness, contrast, saturation, hue shift). Every op runs on the whole batch, as the
    identity on the images that skip it, so nothing depends on how many images take it. Hue, the costly op and the
    one without an exact identity, runs once: between each image's blends that come before it in its order and
    those that come after."""
    hue_slot = order.argsort(1)[:, 3]  # where hue comes in each image's order
    for slot in range(3):  # the blends before it
        x = blend_slot(x, order[:, slot], factors, jittered & (slot < hue_slot))
    x = torch.where(jittered.view(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
    for slot in range(1, 4):  # the blends after it
        x = blend_slot(x, order[:, slot], factors, jittered & (slot > hue_slot))
    return x


def resized_crop(images, box, flip, size):
    """uint8 [B, 3, H, W] -> float [B, 3, size, size] in [0, 1]: each image's crop box (top, left, height, width)
    resized bilinearly, mirrored where flip is set, in one resampling. No antialiasing: crops much larger than
    `size` alias (pretraining crops data of about its own size, where crops are upsampled)."""
    n, _, height, width = images.shape
    top, left, h, w = box.to(torch.float32).unbind(1)
    # The affine map from output to input coordinates, both in [-1, 1] between the outer pixel edges
    # (align_corners=False); a negative x scale mirrors the crop.
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = torch.where(flip, -w, w) / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    # keep samples between the crop's outermost pixel centres, so no pixel outside the crop leaks in at its edges
    low = torch.stack([(2 * left + 1) / width, (2 * top + 1) / height], 1).view(n, 1, 1, 2) - 1
    high = torch.stack([(2 * (left + w) - 1) / width, (2 * (top + h) - 1) / height], 1).view(n, 1, 1, 2) - 1
    return F.grid_sample(images.float() / 255, grid.clamp(low, high), mode="bilinear", align_corners=False)


def gaussian_blur(x, sigma, kernel_size):
    """A separable Gaussian per image (sigma [B]) with reflect padding, as torchvision's GaussianBlur."""
    n, c, height, width = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one per (image, channel)
    pad = kernel_size // 2
    y = x.reshape(1, n * c, height, width)  # grouped convolutions: every channel of every image its own kernel
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, height, width)


class BatchedAugment:
    """view_transform's distribution on whole batches: uint8 [B, 3, H, W] -> normalised float32
    [B, 3, img_size, img_size] on the same device, every image with its own random parameters. Crop, resize and flip
    are one resampling; then colour jitter, greyscale and blur, in torchvision's order (flipping commutes with all
    three). Randomness comes only from the generator passed, so views are reproducible for a seed."""

    def __init__(self, aug, img_size, mean, std):
        self.aug = augmentation(aug)
        self.img_size = img_size
        self.kernel_size = blur_kernel_size(img_size)
        self.mean, self.std = mean, std

    def __call__(self, images, generator=None):
        device = images.device if generator is None else generator.device
        params = self.sample_params(len(images), *images.shape[-2:], generator, device)
        return self.apply(images, {k: v.to(images.device) for k, v in params.items()})

    def sample_params(self, n, height, width, generator=None, device="cpu"):
        """n images' parameters: crop box [n, 4] (top, left, height, width) as RandomResizedCrop draws it, flip,
        jitter, grey and blur coins [n], jitter order [n, 4] (a permutation of the ops), jitter factors [n, 4]
        (brightness, contrast, saturation, hue shift) and blur sigma [n]."""
        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(shape or (n,), generator=generator, device=device)

        def coin(p):
            return torch.rand(n, generator=generator, device=device) < p

        # RandomResizedCrop: 10 tries of (area fraction uniform in scale, log aspect ratio uniform); the first that
        # fits in the image wins, placed uniformly; if none fits, the largest centred box of an allowed ratio.
        area = uniform(*self.aug.scale, n, 10) * (height * width)
        ratio = torch.exp(uniform(math.log(RATIO[0]), math.log(RATIO[1]), n, 10))
        w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(1, keepdim=True)
        w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), fits.any(1)
        w_centre = min(width, round(height * RATIO[1]))
        h_centre = min(height, round(w_centre / RATIO[0]))
        w, h = torch.where(found, w, w_centre), torch.where(found, h, h_centre)
        top = torch.where(found, (uniform(0, 1) * (height - h + 1)).floor(), (height - h) // 2)
        left = torch.where(found, (uniform(0, 1) * (width - w + 1)).floor(), (width - w) // 2)

        b, c, s, hue = self.aug.jitter or (0, 0, 0, 0)
        return {"box": torch.stack([top, left, h, w], 1).long(), "flip": coin(0.5),
                "jitter": coin(self.aug.p_jitter),
                "order": torch.rand(n, 4, generator=generator, device=device).argsort(1),
                "factors": torch.stack([uniform(1 - b, 1 + b), uniform(1 - c, 1 + c), uniform(1 - s, 1 + s),
                                        uniform(-hue, hue)], 1),
                "grey": coin(self.aug.p_grey), "blur": coin(self.aug.p_blur), "sigma": uniform(*BLUR_SIGMA)}

    def apply(self, images, params):
        """Every step runs on the whole batch, as the identity on the images that skip it, so that no step depends on
        how many images take it: on CUDA nothing waits for the GPU (no nonzero, no boolean mask, no .item())."""
        x = resized_crop(images, params["box"], params["flip"], self.img_size)
        if self.aug.p_jitter:
            x = color_jitter(x, params["jitter"], params["order"], params["factors"])
        if self.aug.p_grey:
            x = torch.where(params["grey"].view(-1, 1, 1, 1), grey(x).expand_as(x), x)
        if self.aug.p_blur:
            x = torch.where(params["blur"].view(-1, 1, 1, 1), gaussian_blur(x, params["sigma"], self.kernel_size), x)
        # per channel by Python numbers: a tensor of the means made on CUDA would be a blocking copy from the host
        return torch.stack([(c - m) / s for c, m, s in zip(x.unbind(1), self.mean, self.std)], 1)


# --- the backend choice, made once for every caller that draws augmented views ---

AUG_BACKENDS = ("auto", "batched", "torchvision")


def aug_backend(data, requested="auto"):
    """The augmentation backend for data: "batched" (BatchedAugment on whole batches on the device) needs images in
    memory, "torchvision" (view_transform per image in DataLoader workers) reads anything; "auto" is batched for
    in-memory data sets and torchvision for image files."""
    if requested == "auto":
        return "batched" if data.images is not None else "torchvision"
    if requested == "batched" and data.images is None:
        raise SystemExit(f"--aug-backend batched needs an in-memory data set, and {data.name} is read from image "
                         f"files: use --aug-backend torchvision or auto.")
    return requested


def to_device(t, device):
    """A host tensor on device; to CUDA through pinned memory and without making the host wait for the copy."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def view_batches(data, aug, img_size, order, device, views=2, backend="auto", gen=None, workers=0,
                 loader_gen=None):
    """For each batch of image indices in `order` (an iterable of 1-D CPU tensors): (view_1, ..., view_<views>,
    labels) on device, through the backend aug_backend(data, backend) names. batched: BatchedAugment on whole
    batches on the device (images and labels are copied there once per call unless they already are), drawing from
    gen; torchvision: view_transform per image in DataLoader workers, seeded by loader_gen."""
    if aug_backend(data, backend) == "batched":
        augment = BatchedAugment(aug, img_size, data.mean, data.std)
        images, labels = data.images.to(device), data.labels.to(device)
        for idx in order:
            idx = to_device(idx, images.device)
            x = images[idx]
            yield (*[augment(x, gen) for _ in range(views)], labels[idx])
        return
    transform = view_transform(aug, img_size, data.mean, data.std)
    dataset = ViewDataset(data, transform, views)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[idx.tolist() for idx in order], num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda", generator=loader_gen)
    for batch in loader:
        yield tuple(t.to(device, non_blocking=True) for t in batch)


# --- evaluation ---

def eval_resize(images, img_size):
    """In-memory images (uint8 [B, 3, H, W]) -> float in [0, 1], the shorter side resized to img_size and the
    centre kept. These sets are small, centred images (Fashion-MNIST, CIFAR, STL-10): at their own size this is the
    identity, which is how they are evaluated; ImageNet's 0.875 centre crop would cut off object edges here."""
    x = images.float() / 255
    height, width = x.shape[-2:]
    if (height, width) == (img_size, img_size):
        return x
    scale = img_size / min(height, width)
    x = F.interpolate(x, size=(max(img_size, round(height * scale)), max(img_size, round(width * scale))),
                      mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - img_size) // 2, (x.shape[-1] - img_size) // 2
    return x[..., top:top + img_size, left:left + img_size]


class EvalLoader:
    """Batches (x float32 normalised [B, 3, img_size, img_size], y int64), on device, in data-set order; iterate
    it as often as needed."""

    def __init__(self, data, img_size, batch_size=256, workers=0, device="cpu"):
        self.data, self.img_size, self.batch_size, self.device = data, img_size, batch_size, torch.device(device)
        if data.images is None:
            self.loader = torch.utils.data.DataLoader(
                ViewDataset(data, eval_transform(img_size, data.mean, data.std)), batch_size=batch_size,
                num_workers=workers, pin_memory=self.device.type == "cuda")

    def __len__(self):
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self):
        if self.data.images is None:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device)
            return
        mean = torch.tensor(self.data.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.data.std, device=self.device).view(1, 3, 1, 1)
        for start in range(0, len(self.data), self.batch_size):
            batch = slice(start, start + self.batch_size)
            x = eval_resize(self.data.images[batch].to(self.device), self.img_size)
            yield (x - mean) / std, self.data.labels[batch].to(self.device)


def eval_loader(data, img_size, batch_size=256, workers=0, device="cpu"):
    """The evaluation transform (resize + centre crop, normalised) over a whole data set, for kNN and linear
    evaluation alike."""
    return EvalLoader(data, img_size, batch_size, workers, device)
