"""The GPU presets' own commands, run on the CPU (slow suite): what `bash run_all.sh fmnist|cifar10|imagenet` would run
first on someone's GPU, resolved from the presets themselves (run_all.sh's DRY_RUN, as docs/presets.md is), with only
the budget overridden: a few steps, a small subset, batch, queue and split-BN groups scaled down to what a CPU
holds. Every other flag (small stem, symmetric loss, the strong augmentation, 224 px, split BN, image-file loading
with workers, MoCo's linear protocol with crops and flips) runs as the preset gives it, for resnet18 and
mobilenetv3_small. CIFAR-10 and the
ImageNet-style folder are generated in their real on-disk formats; fmnist reads Debian's Fashion-MNIST. A preset whose
flags no longer fit the scripts fails here rather than in a GPU's first hour."""
import json
import os
import pickle
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import knn_eval
import linear_eval
import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
ARCHS = "resnet18 mobilenetv3_small"

# the budget, per script: appended to the preset's command (argparse keeps a flag's last value)
PRETRAIN = ["--max-steps", "2", "--subset", "128", "--batch-size", "32", "--moco-k", "64", "--bn-group", "16",
            "--knn-subset", "64", "--workers", "2", "--log-every", "1"]
KNN = ["--subset", "64", "--test-subset", "32", "--batch-size", "32", "--workers", "2"]
LINEAR = KNN + ["--epochs", "2", "--schedule", "1"]
# 224 px: smaller steps and banks, and a queue that still holds one symmetric step's keys
IMAGENET = {"pretrain.py": ["--subset", "24", "--batch-size", "8", "--moco-k", "16", "--knn-subset", "16",
                            "--bn-group", "4"],
            "knn_eval.py": ["--subset", "16", "--test-subset", "8"],
            "linear_eval.py": ["--subset", "16", "--test-subset", "8"]}
BUDGET = {"pretrain.py": PRETRAIN, "knn_eval.py": KNN, "linear_eval.py": LINEAR}
SCRIPTS = {"pretrain.py": pretrain, "knn_eval.py": knn_eval, "linear_eval.py": linear_eval}


def fake_cifar10(root, per_file=30):
    """cifar-10-batches-py/ as the python version ships it: five training pickles, one test pickle, the meta file."""
    folder = root / "cifar-10-batches-py"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(y) for y in rng.integers(0, 10, per_file)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                         "labels": labels, "filenames": [f"{j}.png" for j in range(per_file)]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, f, protocol=2)


def fake_imagenet(root, per_class=24):
    """train/ and val/ with one folder per class, images of several sizes, PNG and JPEG, colour and grey."""
    rng = np.random.default_rng(1)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name in ("n01440764", "n01443537"):
            os.makedirs(root / split / name)
            for i in range(count):
                shape = (40 + i, 56, 3) if i % 3 else (48, 40)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                    root / split / name / (f"{i}.png" if i % 2 else f"{i}.JPEG"))


def commands(preset, tmp_path, data_dir):
    """(script, argv) of every command `bash run_all.sh PRESET` would run for ARCHS and seed 0, as it prints them."""
    env = {**os.environ, "DRY_RUN": "1", "ARCHS": ARCHS, "SEEDS": "1", "JOBS": "1", "STUDY_DIR": str(tmp_path),
           "PYTHON": sys.executable, "DATA_DIR": data_dir, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "run_all.sh", preset], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith(sys.executable)]
    return [(argv[1], argv[2:]) for argv in lines]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fmnist", "cifar10", "imagenet"])
def test_a_gpu_preset_runs_its_own_commands_on_the_cpu(tmp_path, preset):
    if preset == "fmnist" and not os.path.exists(FMNIST):
        pytest.skip("needs Debian's dataset-fashion-mnist")
    data_dir = ""
    if preset == "cifar10":
        fake_cifar10(tmp_path / "data")
        data_dir = str(tmp_path / "data")
    elif preset == "imagenet":
        fake_imagenet(tmp_path / "data")
        data_dir = str(tmp_path / "data")
    todo = commands(preset, tmp_path, data_dir)
    # per network: two pretrainings with their kNN and linear evaluation, two random-init references; raw pixels once
    assert [script for script, _ in todo] == (["pretrain.py", "knn_eval.py", "linear_eval.py"] * 2 * 2
                                              + ["knn_eval.py"] * 2 * 2 + ["knn_eval.py"])
    for script, argv in todo:  # each script's main() reads the command line as the process would
        budget = BUDGET[script] + (IMAGENET[script] if preset == "imagenet" else [])
        SCRIPTS[script].main(argv + budget)
        if script == "pretrain.py":  # the run trained as the preset says, for the steps asked
            summary = json.load(open(os.path.join(argv[argv.index("--out") + 1], "summary.json")))
            flags = summary["args"]
            assert summary["steps"] == 2 and not summary["complete"] and flags["bn_splits"] == 2  # split BN on
            assert flags["small_stem"] == (preset != "imagenet") and flags["epochs"] == 200
            assert flags["symmetric"] == ("--symmetric" in argv) and flags["img_size"] == {
                "fmnist": 28, "cifar10": 32, "imagenet": 224}[preset]
        else:
            result = json.load(open(argv[argv.index("--json") + 1]))
            assert result["seconds"] > 0  # written: the evaluation finished
    small = [argv for script, argv in todo if script == "pretrain.py" and "--symmetric" in argv]
    assert len(small) == 2  # the small recipe is symmetric on every GPU preset
    if preset == "imagenet":
        assert all(argv[argv.index("--aug") + 1] == "strong" for argv in small)
