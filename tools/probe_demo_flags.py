"""The table of tools/probe_demo_flags.sh's rows: pretext accuracy per epoch and the kNN monitor per third epoch,
from the logs under results/probes/demo_flags/ (and, for the demo's own runs, results/demo/).

    python3 tools/probe_demo_flags.py
"""
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(folder):
    log = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    acc = ", ".join(f"{r['epoch_acc']:.1f}" for r in log if "epoch_acc" in r)
    knn = " / ".join(f"{r['knn_top1']:.1f}" for r in log if "knn_top1" in r)
    return f"| {os.path.basename(folder)} | {acc} | {knn} |"


def main():
    print("| row | pretext acc per epoch (%) | kNN monitor, epochs 0 / 3 / 6 (/ 9 / 12) |\n|---|---|---|")
    demo = [f"{ROOT}/results/demo/{run}_s0" for run in ("mobilenetv3_small_baseline", "mobilenetv3_large_baseline",
                                                        "mobilenetv3_large_small")]
    for folder in [d for d in demo if os.path.isdir(d)] + sorted(glob.glob(f"{ROOT}/results/probes/demo_flags/*/")):
        if os.path.exists(os.path.join(folder, "log.jsonl")):
            print(row(folder.rstrip("/")))


if __name__ == "__main__":
    main()
