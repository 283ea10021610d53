import os
import sys

import pytest
import torch

# Tests import the top-level modules and scripts (models, losses, data, pretrain, ...) directly.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of a few minutes; run them with `-m slow`")
    config.addinivalue_line("markers", "cuda: needs a GPU torch can use, skipped without one; `-m cuda` runs them "
                                       "alone (bash run_all.sh gpucheck does)")
    if not config.option.markexpr:
        config.option.markexpr = "not slow"  # the default run stays fast
    if config.option.durations is None:
        config.option.durations = 15  # the slowest tests, in every log: what to trim when the suite grows


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device that torch can use")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
