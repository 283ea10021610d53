"""Probe: how hard is instance discrimination on Fashion-MNIST at 28 px, for any features? For 1024 training
images, each with two `small` views (data.BatchedAugment), how often is the nearest of the 1024 second views
(cosine) the image's own, in raw pixels and in an untrained mobilenetv3_small, for three crop scales.

    python3 tools/probe_task_ceiling.py                    # about a minute
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import models  # noqa: E402


@torch.no_grad()
def own_view_first(z1, z2):
    """% of rows of z1 whose most similar row of z2 (cosine) is their own."""
    sim = F.normalize(z1.flatten(1), dim=1) @ F.normalize(z2.flatten(1), dim=1).T
    return 100 * (sim.argmax(1) == torch.arange(len(z1))).float().mean().item()


def main():
    images = data.load_data("fashionmnist", "train", subset="1024")
    torch.manual_seed(0)
    network = models.build_backbone("mobilenetv3_small")[0].eval()
    print("| crop scale | raw pixels | random-init mobilenetv3_small |\n|---|---|---|")
    for low in (0.2, 0.5, 0.8):
        data.AUGMENTATIONS["probe"] = data.AUGMENTATIONS["small"]._replace(scale=(low, 1.0))
        aug, gen = data.BatchedAugment("probe", 28, images.mean, images.std), torch.Generator().manual_seed(0)
        v1, v2 = aug(images.images, gen), aug(images.images, gen)
        with torch.no_grad():
            f1, f2 = network(v1), network(v2)
        print(f"| ({low}, 1) | {own_view_first(v1, v2):.1f}% | {own_view_first(f1, f2):.1f}% |", flush=True)


if __name__ == "__main__":
    main()
