"""Probe: how far the slow health test's run (tests/test_pretrain.py::test_fashion_mnist_training_is_healthy:
resnet18, the demo's baseline, 3 epochs on 20k Fashion-MNIST images) moves its kNN monitor, with the test's flags
and with the old demo flags the test must fail, and its pretext accuracy per epoch. Run it with
ONEDNN_MAX_CPU_ISA=AVX2 to see the same run through oneDNN's AVX2 kernels (docs/training-health.md, The slow test).

    .venv/bin/python tools/probe_health_margin.py          # about 2 min per run on machine A
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain  # noqa: E402

BASE = ["--arch", "resnet18", "--data", "fashionmnist", "--subset", "20000", "--epochs", "3", "--batch-size", "128",
        "--moco-k", "1024", "--moco-m", "0.99", "--moco-t", "0.2", "--mlp-hidden", "0", "--head-bn", "--wd", "5e-4",
        "--aug", "small", "--aug-backend", "batched", "--channels-last", "--knn-every", "3", "--knn-subset", "5000",
        "--log-every", "52"]
RUNS = {"the test's flags": ["--lr", "0.03", "--bn-splits", "2"],
        "the old demo flags": ["--lr", "0.06", "--bn-group", "16"]}

if __name__ == "__main__":
    for name, flags in RUNS.items():
        with tempfile.TemporaryDirectory() as out:
            start = time.time()
            pretrain.main(BASE + flags + ["--out", out])
            log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        print(f"{name}: pretext acc per epoch {[round(r['epoch_acc'], 2) for r in log if 'epoch_acc' in r]}, kNN "
              f"{[r['knn_top1'] for r in log if 'knn_top1' in r]}, {time.time() - start:.0f} s", flush=True)
