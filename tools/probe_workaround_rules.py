"""Probe (issue 46): which form of models.SmallMapConv2d's workaround to switch on where. The demo's training step
(bench.run_steps: 28 px, ImageNet stem, batch 128, K 1024, split BN 2, channels_last), per network, under four rules,
each timed twice in alternating runs (the mean of the two medians, step and the query's forward-backward, ms):

    plain     nn.Conv2d everywhere
    live      the taps that only multiply padding left out (every padded convolution)
    zeros     live, and a depthwise convolution whose padding is at least half its map given explicit zeros
    dense     live for dense convolutions alone (depthwise ones as nn.Conv2d)

Run it natively and with ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN's AVX2 kernels on the same CPU):

    .venv/bin/python tools/probe_workaround_rules.py
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python tools/probe_workaround_rules.py
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402 - the project's modules, from the repository root
import data  # noqa: E402
import models  # noqa: E402

WORKAROUND = models.SmallMapConv2d.forward
ISA = models.x86_isa()  # this CPU's, as oneDNN sees it


def rule(name):
    """Set models' workaround to `name`'s form."""
    models.ONEDNN_WORKAROUND = name != "plain"

    def forward(self, x):
        if name == "dense" and self.groups > 1:
            return torch.nn.Conv2d.forward(self, x)
        return WORKAROUND(self, x)

    models.x86_isa = (lambda: "avx2") if name == "zeros" else (lambda: "avx512") if name in ("live", "dense") \
        else (lambda: ISA)
    models.SmallMapConv2d.forward = forward


def main():
    args = bench.get_args(["--img-size", "28", "--batch-size", "128", "--moco-k", "1024", "--bn-splits", "2",
                           "--warmup", "1", "--steps", "5", "--workers", "2"])
    images, labels = data.synthetic_data("train", 512, size=28)
    train = data.ImageData("synthetic", images, None, labels, 10, *data.STATS["synthetic"])
    rules = ("plain", "live", "zeros", "dense")
    print(f"oneDNN ISA: {os.environ.get('ONEDNN_MAX_CPU_ISA') or 'native'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; step / query forward-backward, ms (mean of two alternating runs)")
    print(f"| network | {' | '.join(rules)} |\n|---|" + "---|" * len(rules))
    for arch in models.STUDY:
        targs = bench.train_args(args, arch, 28, channels_last=True, amp="auto", compile=False)
        times = {r: [] for r in rules}
        for _ in range(2):
            for r in rules:
                rule(r)
                phases, _ = bench.run_steps(train, targs, torch.device("cpu"), args, "batched", parts=True)
                times[r].append((1e3 * phases["step"], 1e3 * phases["query_fwd_bwd"]))
        cells = [f"{statistics.mean(s for s, _ in t):.0f} / {statistics.mean(q for _, q in t):.0f}"
                 for t in times.values()]
        print(f"| {arch} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
