"""Probe: can the key encoder find the query's positive at all? Trains with pretrain.train_step on random batches
of the demo's 20k Fashion-MNIST images, where the key encoder sees the query's own view (x2 = x1) unless
--two-views, and prints the mean pretext accuracy over the last 25 steps. With identical views a healthy set-up
wins almost always; what stops it is the set-up itself (docs/training-health.md: BN groups of 16 images at 1x1
feature maps, a high momentum at a high lr).

    python3 tools/probe_identical_views.py                 # the table of docs/training-health.md (about 5 min)
    python3 tools/probe_identical_views.py --bn-splits 2 --moco-m 0.9 --lr 0.06
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import pretrain  # noqa: E402

# the demo's baseline recipe (run_all.sh), mobilenetv3_small; --lr per 256 images, so 0.03 is 0.015 at batch 128
DEMO = ["--arch", "mobilenetv3_small", "--data", "fashionmnist", "--subset", "20000", "--batch-size", "128",
        "--moco-k", "1024", "--moco-t", "0.2", "--mlp-hidden", "0", "--head-bn", "--wd", "5e-4", "--aug", "small",
        "--channels-last", "--device", "cpu"]
ROWS = [  # (label, bn_splits, moco_m, lr per 256)
    ("BN groups of 16 images", 8, 0.99, 0.03),
    ("BN groups of 64 images", 2, 0.99, 0.03),
    ("one BN group of 128", 1, 0.99, 0.03),
    ("groups of 64, m 0.9", 2, 0.9, 0.03),
    ("groups of 64, m 0.9, lr 0.12 per 256 (0.06)", 2, 0.9, 0.12),
]


def probe(train, bn_splits, moco_m, lr, steps, two_views, seed=0):
    """Mean pretext accuracy (%) over the last 25 of `steps` steps at a constant lr."""
    args = pretrain.get_args(DEMO + ["--bn-splits", str(bn_splits), "--moco-m", str(moco_m), "--lr", str(lr),
                                     "--seed", str(seed)])
    args.img_size = 28
    torch.manual_seed(seed)
    raw, optimizer, scaler, autocast = pretrain.build(args, torch.device("cpu"))
    raw.to(memory_format=torch.channels_last)
    order = torch.randint(len(train), (steps, 128), generator=torch.Generator().manual_seed(seed))
    gen, accs = torch.Generator().manual_seed(seed), []
    for x1, x2, _ in data.view_batches(train, "small", 28, order, "cpu", backend="batched", gen=gen):
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last) if two_views else x1
        accs.append(pretrain.train_step(raw, x1, x2, optimizer, scaler, autocast, args, moco_m, 0.0)[1].item())
    return sum(accs[-25:]) / 25


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bn-splits", type=int, help="one probe with these settings instead of the table")
    p.add_argument("--moco-m", type=float, default=0.99)
    p.add_argument("--lr", type=float, default=0.03, help="per 256 images, as pretrain.py's")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--two-views", action="store_true", help="the key encoder sees the second view, as in training")
    args = p.parse_args()
    train = data.load_data("fashionmnist", "pretrain", subset="20000")
    rows = ROWS if args.bn_splits is None else [("given", args.bn_splits, args.moco_m, args.lr)]
    sees = "the second view" if args.two_views else "the query's own view"
    print(f"| key encoder sees | set-up | pretext acc, last 25 of {args.steps} steps |\n|---|---|---|")
    for label, splits, m, lr in rows:
        acc = probe(train, splits, m, lr, args.steps, args.two_views)
        print(f"| {sees} | {label} | {acc:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
