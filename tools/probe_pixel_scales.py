"""Probe: the raw-pixel kNN reference on Fashion-MNIST with the full 60k bank and the 10k test images (weighted,
cosine, T 0.1), for pixels in [0, 1] and for the evaluation transform's normalised pixels (knn_eval.py --pixels).

    python3 tools/probe_pixel_scales.py                    # about 3 minutes on 2 cores
"""
import os
import sys

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from evaluation import knn_predict, topk_accuracy  # noqa: E402


def main():
    train, test = data.load_data("fashionmnist", "train"), data.load_data("fashionmnist", "test")
    mean, std = train.mean[0], train.std[0]  # one grey channel, repeated three times in memory
    print("| pixels | k 20 | k 200 |\n|---|---|---|")
    for name, scale in (("in [0, 1]", lambda x: x), ("normalised (knn_eval.py --pixels)", lambda x: (x - mean) / std)):
        bank, query = (F.normalize(scale(d.images[:, :1].flatten(1).float() / 255), dim=1) for d in (train, test))
        top1 = [topk_accuracy(knn_predict(query, bank, train.labels, 10, k, 0.1), test.labels)[0] for k in (20, 200)]
        print(f"| {name} | {top1[0]:.2f} | {top1[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
